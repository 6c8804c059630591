"""jizhictl cube: build, inspect, push and read an LMDB cube (the bundle's cube/data.mdb, docs/formats.md).

Offline: these commands read and write files (and a Redis Cluster, for
``push`` and ``layout``). Only ``cube info`` asks a running jizhid, for the
hot tier's figures, through the ``stats`` control command, read-only.
The storage micro-benchmark (``cube bench``) is a tool:
``jizhi.tools.commands`` adds it to this group. The cube modules (lmdb,
numba) are imported by the command that uses them, so jizhictl starts
without them.
"""
import json
import os
import sys
import time
import tomllib
from pathlib import Path

import click

from jizhi import control
from jizhi.ctl import figures
from jizhi.ctl.progress import ProgressBar
from jizhi.ctl.reach import EXIT_ERROR_REPLY, run_dir_option


@click.group()
def cube():
    """Build, inspect and benchmark an LMDB cube (the bundle's cube/data.mdb, docs/formats.md).

    Offline tools: they read and write files. Only `cube info` asks a running
    jizhid for the hot tier's figures, read-only, and is fine without one.
    Exit codes: 0 success; 2 usage error or refused input (a bad table, an
    existing OUT_DIR, Parquet without pyarrow); 3 the daemon answered an
    error (`cube info`).
    """


class _SignatureType(click.ParamType):
    """A signature on the command line: decimal or 0x-hex, 0 .. 2**64-1."""

    name = "signature"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        s = value.strip().replace("_", "")
        try:
            v = int(s, 16) if s.lower().startswith("0x") else int(s, 10)
        except ValueError:
            self.fail(f"{value!r} is not a signature (decimal, or hex with 0x)", param, ctx)
        if not 0 <= v < 2 ** 64:
            self.fail(f"{value} is not a signature (0 .. 2**64-1)", param, ctx)
        return v


def _locate_cube(path):
    from jizhi.cube.build import TableError, locate_cube
    try:
        return locate_cube(path)
    except TableError as e:
        raise click.BadParameter(str(e), param_hint="CUBE_DIR_OR_BUNDLE")


@cube.command("build")
@click.argument("out_dir", type=click.Path())
@click.option("--from", "tables", multiple=True, type=click.Path(),
              help="An input table (repeatable): a .npz with arrays `keys` and `vectors`, a directory holding "
                   "keys.npy and vectors.npy, or a .parquet file with columns `signature` and `vector`.")
@click.option("--keys", "keys_files", multiple=True, type=click.Path(),
              help="A keys .npy (uint64 [K]) to pair with the --vectors of the same position (repeatable).")
@click.option("--vectors", "vectors_files", multiple=True, type=click.Path(),
              help="A vectors .npy (float32 [K, dim]) for the --keys of the same position (repeatable).")
@click.option("--dim", type=click.IntRange(min=1), default=None, help="Refuse input whose vectors are not this long.")
@click.option("--txn-mb", type=click.IntRange(min=1), default=64, show_default=True,
              help="Vector bytes written per LMDB write transaction (what the writer holds in memory).")
def cube_build(out_dir, tables, keys_files, vectors_files, dim, txn_mb):
    """Write a new cube directory OUT_DIR (LMDB: data.mdb) from signature/vector tables.

    \b
    Input layouts (every table: distinct uint64 signatures, float32 vectors of one dim):
      --from T.npz              arrays `keys` uint64 [K] and `vectors` float32 [K, dim] (read into RAM)
      --from DIR                DIR/keys.npy and DIR/vectors.npy, the same arrays (memory-mapped)
      --keys K.npy --vectors V.npy   the same, any names (memory-mapped)
      --from T.parquet          columns `signature` uint64 (int64: the same 64 bits) and `vector`
                                list<float32> (read into RAM; needs pip install 'jizhi[parquet]')

    Refused (exit 2, nothing written): an existing OUT_DIR, a signature that
    appears twice (in one table or across tables), keys that are not uint64,
    vectors that are not float32 [K, dim], tables of different dims (or not
    --dim), a vector holding NaN or infinity. The cube is written in LMDB key
    order, --txn-mb of vectors per write transaction, into a hidden directory
    beside OUT_DIR that is renamed to OUT_DIR when complete. Ship it as a
    bundle version's cube/ (docs/formats.md).
    """
    from jizhi.cube.build import TableError, open_npy_pair, open_table, plan_cube
    if os.path.lexists(out_dir):
        raise click.BadParameter(f"{out_dir} exists already (a cube is written into a new directory)",
                                 param_hint="OUT_DIR")
    if len(keys_files) != len(vectors_files):
        raise click.UsageError(f"{len(keys_files)} --keys but {len(vectors_files)} --vectors: give them in pairs")
    if not tables and not keys_files:
        raise click.UsageError("no input: give --from TABLE or --keys K.npy --vectors V.npy")
    try:
        inputs = [open_table(t) for t in tables] + [open_npy_pair(k, v) for k, v in zip(keys_files, vectors_files)]
        for t in inputs:
            click.echo(f"{t.name}: {len(t):,} keys, dim {t.dim}", err=True)
        plan = plan_cube(out_dir, inputs, dim=dim)
        txn_entries = max(1, (txn_mb << 20) // (4 * plan.dim))
        with click.progressbar(length=len(plan), label=f"writing {out_dir}", file=sys.stderr,
                               show_pos=True) as bar:
            r = plan.write(txn_entries=txn_entries, progress=bar.update)
    except TableError as e:
        raise click.UsageError(str(e))
    except OSError as e:   # includes lmdb's errors that are OSError; disk full, permissions
        raise click.ClickException(f"writing {out_dir} failed: {e}")
    click.echo(f"cube {out_dir}: {r['keys']:,} keys, dim {r['dim']}, data.mdb {r['bytes']:,} bytes, "
               f"{r['transactions']} write transaction{'s' if r['transactions'] != 1 else ''}")


def _cube_daemon(run_dir, instance, version_dir):
    """The hot tier's figures from a running jizhid's `stats` (read-only), or why there are none."""
    dirs = [Path(run_dir).absolute()] if run_dir else control.run_dir_candidates(instance)
    try:
        live = [d for d in dirs if control.present(d)]
    except control.NoAccess as e:
        return {"running": False, "instance": instance, "note": f"{e}: no hot-tier figures"}
    if not live:
        return {"running": False, "instance": instance,
                "note": f"jizhid is not running (no control socket in {', '.join(map(str, dirs))}): "
                        "no hot-tier figures"}
    try:
        info = control.call(live[0], "stats", None, timeout_s=3.0)
    except ConnectionError as e:
        return {"running": False, "instance": instance, "run_dir": str(live[0]),
                "note": f"jizhid is not answering on {live[0] / control.SOCKET_NAME} ({e}): no hot-tier figures"}
    except control.ControlError as e:
        click.echo(f"jizhictl: stats refused: {e}", err=True)
        sys.exit(EXIT_ERROR_REPLY)
    serves = []
    if version_dir is not None:
        mine = os.path.realpath(version_dir)
        for model, m in info.get("models", {}).items():
            for v in m.get("versions", []):
                if v.get("path") and os.path.realpath(v["path"]) == mine:
                    serves.append({"model": model, "version": v["version"], "state": v["state"]})
    models = {s["model"] for s in serves}
    pipelines = {p: dict(info.get("cube", {}).get(p, {}), model=x.get("model"),
                         versions={str(k): v.get("state") for k, v in x.get("versions", {}).items()})
                 for p, x in info.get("pipelines", {}).items() if not models or x.get("model") in models}
    return {"running": True, "instance": instance, "run_dir": str(live[0]), "serves_this_cube": serves,
            "pipelines": pipelines}


@cube.command("info")
@click.argument("cube_dir_or_bundle", type=click.Path(exists=True, file_okay=False))
@run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cube_info(cube_dir_or_bundle, run_dir, instance, as_json):
    """Keys, dim, file size, the LMDB tree, whether the Numba reader verifies, and the hot tier's hit ratios.

    CUBE_DIR_OR_BUNDLE: a cube directory (data.mdb), a bundle version
    directory, a model directory (its newest version) or a demo directory.
    The hot tier's figures (lookups, hot hits, hit ratio since start and over
    the last minute, per pipeline) come from a running jizhid's `stats`
    (--run-dir/--instance find it as for `jizhictl stats`); without one,
    the file's figures alone, exit 0.
    """
    from jizhi.cube.build import TableError, describe
    cube_dir, mdim, version_dir = _locate_cube(cube_dir_or_bundle)
    try:
        d = describe(cube_dir)
    except TableError as e:
        raise click.BadParameter(str(e), param_hint="CUBE_DIR_OR_BUNDLE")
    vdim = d["value_bytes"] // 4 if d["value_bytes"] else None
    dim = mdim or vdim
    problems = []
    if mdim and d["value_bytes"] is not None and d["value_bytes"] != mdim * 4:
        problems.append(f"the manifest says dim {mdim} but the first value has {d['value_bytes']} bytes")
    verified = False
    if dim and d["keys"]:
        from jizhi.cube.store import Cube
        c = Cube(cube_dir, dim)
        verified = c.btree is not None
        c.close()
    daemon = _cube_daemon(run_dir, instance, version_dir)
    out = dict(cube=cube_dir, bundle=version_dir, dim=dim, **d, numba_reader_verified=verified,
               problems=problems, daemon=daemon)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"cube      {cube_dir}" + (f"  (bundle {version_dir})" if version_dir else ""))
    click.echo(f"keys      {d['keys']:,}")
    click.echo(f"dim       {dim if dim else '- (empty cube)'}" + (" (manifest.toml)" if mdim else
                                                                   " (from the first value's size)" if dim else ""))
    click.echo(f"file      data.mdb {d['file_bytes']:,} bytes ({d['file_bytes'] / 2 ** 20:.1f} MiB)")
    click.echo(f"LMDB      depth {d['depth']}, {d['page_bytes']:,}-byte pages: {d['branch_pages']:,} branch, "
               f"{d['leaf_pages']:,} leaf, {d['overflow_pages']:,} overflow; last page {d['last_page']:,}, "
               f"last txn {d['last_txnid']}")
    click.echo("reader    " + ("the Numba B+tree reader verified against liblmdb (workers use it)" if verified else
                               "the Numba B+tree reader did not verify: workers read through liblmdb (slower)"))
    for p in problems:
        click.echo(f"problem   {p}")
    if not daemon["running"]:
        click.echo(f"hot tier  {daemon['note']}")
        return
    where = f"jizhid ({'' if run_dir else f'instance {instance}, '}run dir {daemon['run_dir']})"
    if daemon["serves_this_cube"]:
        click.echo(f"hot tier  {where} serves this cube: " + ", ".join(
            f"model {s['model']} version {s['version']} ({s['state']})" for s in daemon["serves_this_cube"]))
    else:
        click.echo(f"hot tier  {where} does not serve this cube; its pipelines:")
    for pname, c in daemon["pipelines"].items():
        if "lookups" not in c:
            click.echo(f"  pipeline {pname}: no cube figures")
            continue
        last = c.get("last_minute") or {}
        click.echo(f"  pipeline {pname} (model {c['model']}): {c['lookups']:,} lookups, {c['hot_hits']:,} hot hits "
                   f"({figures.ratio(c['hot_ratio'])}) since start; last minute {figures.ratio(last.get('hot_ratio'))} "
                   f"of {last.get('lookups', 0):,} lookups")


@cube.command("push")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--redis", "url", required=True, metavar="URL",
              help="The cluster: redis://HOST:PORT[,HOST:PORT...] (any nodes; the rest are discovered).")
@click.option("--strategy", type=click.Choice(["key", "table", "model"]), default=None,
              help="Table mapping: key (every table over every shard), table (whole tables bin-packed onto "
                   "shards by size), model (a bundle's tables together on one shard). Default: the manifest's "
                   "cube_mapping, else key.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cube_push(bundles, url, strategy, quiet):
    """Load the cubes of BUNDLE version directories into a Redis Cluster.

    Keys are written with pipelined MSETs, one pipeline per master; each
    bundle's layout record goes last, so jizhid never reads a half-pushed
    cube. Serve it with the cube_accessor option
    remote = "redis://HOST:PORT,.../{name}/{version}" (docs/formats.md,
    "A cube on Redis Cluster"). Pushing again overwrites the vectors; keys of
    an earlier push with another strategy stay until the cluster is flushed.
    Exit codes: 0 pushed; 2 a bad bundle or URL; 1 the cluster refused or
    did not answer.
    """
    from jizhi.bundle import Bundle, BundleError
    from jizhi.cube.cluster import parse_url
    from jizhi.cube.push import push
    from jizhi.cube.resp import RedisError
    try:
        bs = [Bundle(b) for b in bundles]
        if strategy is None:
            with open(bs[0].path / "manifest.toml", "rb") as f:
                strategy = tomllib.load(f).get("cube_mapping", "key")
        parse_url(url)
    except (BundleError, ValueError, OSError) as e:
        raise click.UsageError(str(e))
    t0 = time.monotonic()
    bar = []

    def progress(done, total):
        if not bar:
            bar.append(ProgressBar("pushing keys", total, not quiet))
        bar[0].advance(done - bar[0].done)
    try:
        docs = push(bs, url, strategy, progress=progress)
        if bar:
            bar[0].close()
    except (OSError, RuntimeError, RedisError) as e:
        click.echo(f"jizhictl cube push: {e}", err=True)
        sys.exit(1)
    except ValueError as e:
        raise click.UsageError(str(e))
    for d in docs:
        click.echo(f"pushed {d['namespace']}: {d['keys']:,} keys, dim {d['dim']}, strategy {d['strategy']}, "
                   f"{len(d['units'])} unit(s) in {time.monotonic() - t0:.1f} s")


@cube.command("layout")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--redis", "url", required=True, metavar="URL", help="The cluster: redis://HOST:PORT[,HOST:PORT...].")
@click.option("--json", "as_json", is_flag=True, help="Print the layout record as JSON.")
def cube_layout(bundle, url, as_json):
    """Print where each table of a pushed BUNDLE lives and the shard round trips per lookup batch.

    Reads the layout record `jizhictl cube push` wrote and the cluster's
    current slot map (after a failover the promoted replica is named).
    Exit codes: 0; 1 not pushed or the cluster did not answer; 2 a bad bundle.
    """
    from jizhi.bundle import Bundle, BundleError
    from jizhi.cube.layout import describe, read_layout
    from jizhi.cube.resp import RedisError
    try:
        b = Bundle(bundle)
        doc, cluster = read_layout(url, b.name, b.version)
    except (BundleError, ValueError) as e:
        raise click.UsageError(str(e))
    except (OSError, RedisError) as e:
        click.echo(f"jizhictl cube layout: {e}", err=True)
        sys.exit(1)
    if doc is None:
        click.echo(f"jizhictl cube layout: {b.name} {b.version} is not in the cluster (jizhictl cube push)", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for line in describe(doc, cluster):
        click.echo(line)


@cube.command("get")
@click.argument("cube_dir_or_bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("signatures", nargs=-1, required=True, type=_SignatureType())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cube_get(cube_dir_or_bundle, signatures, as_json):
    """Print the vector of each SIGNATURE (decimal or 0x hex), or that it is missing.

    A signature missing from the cube reads the default vector (zeros) in
    the pipeline; it is reported as missing, with exit code 0.
    """
    from jizhi.cube.build import TableError, describe, get_vectors
    cube_dir, mdim, _ = _locate_cube(cube_dir_or_bundle)
    try:
        vb = describe(cube_dir)["value_bytes"]
        dim = mdim or (vb // 4 if vb else 0)
        got = get_vectors(cube_dir, signatures, dim)
    except TableError as e:
        raise click.BadParameter(str(e), param_hint="CUBE_DIR_OR_BUNDLE")
    if as_json:
        click.echo(json.dumps([{"signature": s, "hex": f"0x{s:016x}", "found": v is not None,
                                "vector": None if v is None else [float(x) for x in v]} for s, v in got], indent=2))
        return
    for s, v in got:
        text = "missing: the default vector (zeros)" if v is None else " ".join(f"{x:.9g}" for x in v)
        click.echo(f"{s} (0x{s:016x}): {text}")
