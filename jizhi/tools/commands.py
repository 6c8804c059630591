"""The tools' jizhictl commands, added to jizhictl's group (``jizhi.ctl.main.cli``); ``main`` runs them all.

jizhictl sits below the tools: ``jizhi.ctl`` never imports ``jizhi.tools``.
This module is the one place the two meet. It adds the tools' commands to
the ctl's group and subgroups: ``bench``, ``bench-reload``, ``bench-shape``
and ``tune`` (each defined by its tool), the ``demo`` and ``profiles`` groups, ``import``, ``publish``,
``shed train`` and ``cube bench`` (defined here). ``bin/jizhictl`` runs
``main``: the whole CLI. The tools' heavy modules (numba, onnx,
onnxruntime) are imported by the command that runs them, so jizhictl starts
without them.
"""
import json
import os
from pathlib import Path

import click

from jizhi import priority
from jizhi.ctl.cube import cube
from jizhi.ctl.inputs import Trace, resolve_bundle
from jizhi.ctl.main import cli, run
from jizhi.ctl.reach import refused
from jizhi.ctl.shed import shed
from jizhi.errors import BundleError
from jizhi.tools.bench import bench_command
from jizhi.tools.reloadbench import bench_reload_command
from jizhi.tools.shedbench import shape_command
from jizhi.tools.tune import tune_command


# -- demo ---------------------------------------------------------------------

@click.group()
def demo():
    """Create the demo model bundle and request traces."""


@demo.command("publish")
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--from", "source", type=int, default=1, show_default=True, help="Version to copy.")
@click.option("--to", "version", type=int, required=True, help="The new version number.")
@click.option("--seed", type=int, default=None, help="New dense weights from this seed (the version scores differently).")
@click.option("--fault", type=click.Choice(["corrupt", "wrong_dim", "nan", "bad_onnx"]), default=None,
              help="Make a deliberately bad version, to watch the server reject it.")
@click.option("--idle/--no-idle", default=True, show_default=True,
              help="Copy at the idle CPU and I/O priority (SCHED_IDLE, ioprio idle class): on a serving machine the "
                   "copy takes only what jizhid leaves.")
@click.option("--pace", type=click.FloatRange(0, 1, min_open=True), default=priority.COMMAND_PACE[("demo", "publish")],
              show_default=True,
              help="Run SHARE of the time, stopped for the rest of every 20 ms (bin/jizhictl runs the command as a "
                   "paced child): its kernel work (copies, page faults) does not delay serving, whatever its "
                   "priority. 1: not paced.")
def demo_publish(models_dir, source, version, seed, fault, idle, pace):
    """Publish a new demo version the way a training pipeline should: copy into MODELS_DIR/.incoming, then rename.

    A running jizhid notices it within models.poll_interval_s, validates it,
    loads it beside the serving version and switches when it is warm.
    """
    from jizhi.tools.demo import publish, stage_version
    if idle:
        priority.idle()
    src = Path(models_dir) / "demo" / str(source)
    if not src.is_dir():
        raise refused(f"no demo version {source} in {models_dir}")
    staged = stage_version(models_dir, src, version, seed=seed, fault=fault)
    try:
        final = publish(staged, models_dir)
    except FileExistsError as e:
        raise refused(f"{e} exists already")
    click.echo(f"published {final}" + (f" (fault: {fault})" if fault else ""))


@demo.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=7, show_default=True, help="Everything is deterministic from this seed.")
@click.option("--users", default=10_000, show_default=True)
@click.option("--items", default=100_000, show_default=True)
@click.option("--trace-requests", default=0, show_default=True,
              help="Also write DIRECTORY/trace.npz with this many requests (0: none).")
@click.option("--candidates", default=500, show_default=True, help="Candidates per trace request.")
@click.option("--spearman", default=0.8, show_default=True,
              help="Target Spearman correlation between recall scores and the model's scores.")
@click.option("--vocab-scale", type=click.IntRange(min=1), default=1, show_default=True,
              help="Multiply the category and multihot vocabularies (not item ids): a larger cube, e.g. one "
                   "that a small cube.hot_tier_mb holds only part of.")
def demo_init(directory, seed, users, items, trace_requests, candidates, spearman, vocab_scale):
    """Write a complete demo bundle into DIRECTORY/models/demo/1.

    A DLRM-style model (13 dense user features, 9 user and 8 item sparse
    fields, embedding dim 32), its LMDB cube, columnar profiles of USERS users
    and ITEMS items with Zipf-like popularity. Serve it with
    `jizhid --models DIRECTORY/models`.
    """
    from jizhi.tools.demo import generate_trace, init_demo
    try:
        vdir = init_demo(directory, seed=seed, users=users, items=items, vocab_scale=vocab_scale)
    except FileExistsError as e:
        raise refused(f"{e} (remove it or choose another DIRECTORY)")
    click.echo(f"bundle: {vdir}")
    if trace_requests:
        out = Path(directory) / "trace.npz"
        generate_trace(vdir, out, requests=trace_requests, candidates=candidates, spearman=spearman, seed=seed)
        click.echo(f"trace: {out}")


@demo.command("head")
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--hidden", default="256,128", show_default=True,
              help="Widths of the head's top MLP, comma-separated: 64 is light, 512,256,128 heavy.")
@click.option("--seed", type=int, default=11, show_default=True, help="Its weights are deterministic from this seed.")
def demo_head(models_dir, name, version, hidden, seed):
    """Write a head bundle MODELS_DIR/NAME/VERSION on the demo's features.

    A head is a dense-only model version (manifest `head = true`: dense.onnx,
    no cube, no profiles) that a pipeline serves on the demo's features and
    cube: a model_inference stage with `model = "NAME"`. The multi-objective,
    cascade and A/B example pipelines (etc/pipelines/multi_objective.toml,
    cascade.toml, ab.toml) use heads named ctr, cvr and dwell:

    \b
      jizhictl demo head MODELS ctr --hidden 64
      jizhictl demo head MODELS cvr --hidden 256,128
      jizhictl demo head MODELS dwell --hidden 512,256,128
    """
    from jizhi.tools.demo import write_head
    try:
        widths = tuple(int(x) for x in hidden.split(","))
    except ValueError:
        raise click.BadParameter(f"{hidden!r} is not comma-separated widths, e.g. 256,128", param_hint="--hidden")
    try:
        vdir = write_head(models_dir, name, version=version, hidden=widths, seed=seed, progress=True)
    except FileExistsError as e:
        raise refused(f"{e} exists already (a version is written once; choose another --version)")
    except (ValueError, BundleError) as e:
        raise refused(str(e))
    click.echo(f"head bundle: {vdir}")


@demo.command("trace")
@click.argument("version_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--requests", default=2000, show_default=True)
@click.option("--candidates", default=500, show_default=True)
@click.option("--spearman", default=0.8, show_default=True,
              help="Mean Spearman correlation of recall scores with the model's scores, per request.")
@click.option("--spread", default=0.0, show_default=True,
              help="Requests differ: each its own correlation in SPEARMAN +- SPREAD, visible in the spread of its "
                   "recall scores (for the learned shedding policy).")
@click.option("--seed", default=1, show_default=True)
def demo_trace(version_dir, out, requests, candidates, spearman, spread, seed):
    """Write a request trace (OUT, .npz) for the bundle at VERSION_DIR.

    The default 2000 requests replay without repeats for 20 s at 100 requests/s
    (`jizhictl bench --trace OUT --rate 100 --duration 20`): a bench point needs
    rate x duration distinct requests.
    """
    try:
        version_dir = resolve_bundle(version_dir)   # a model directory: its newest version
    except click.BadParameter as e:
        e.param_hint = "VERSION_DIR"
        raise
    from jizhi.tools.demo import generate_trace     # (numba, onnx: after the arguments are checked)
    generate_trace(version_dir, out, requests=requests, candidates=candidates, spearman=spearman, seed=seed,
                   spread=spread)
    click.echo(f"trace: {out}")


# -- publish: a version copied into a watched model directory, paced ----

@click.command("publish")
@click.argument("version_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("models_dir", type=click.Path(file_okay=False))
@click.option("--idle/--no-idle", default=True, show_default=True,
              help="Copy at the idle CPU and I/O priority (SCHED_IDLE, ioprio idle class): on a serving machine the "
                   "copy takes only what jizhid leaves.")
@click.option("--pace", type=click.FloatRange(0, 1, min_open=True), default=priority.COMMAND_PACE[("publish",)],
              show_default=True,
              help="Run SHARE of the time, stopped for the rest of every 20 ms (bin/jizhictl runs the command as a "
                   "paced child; the copy goes 1 MiB per system call so that it can be stopped), where the copy's "
                   "kernel work delays serving whatever its priority. 1: not paced.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def publish_command(version_dir, models_dir, idle, pace, quiet):
    """Publish the bundle version VERSION_DIR into MODELS_DIR, the directory a jizhid watches.

    What the README's `cp -r` into MODELS_DIR/.incoming and `mv` to
    MODELS_DIR/NAME/VERSION do (name and version from VERSION_DIR's
    manifest), at the idle priority (paced with --pace), every file flushed
    to disk before the one rename. The manifest is read and every file it
    lists checked for its size before anything is copied; what a publisher
    of the same version killed mid-copy left in .incoming is removed. A
    running jizhid notices the version within models.poll_interval_s,
    validates it, loads it beside the serving version and switches when it
    is warm.

    \b
      jizhictl publish /build/ctr/42 /var/lib/jizhi/models
    """
    from jizhi.ctl.progress import ProgressBar
    from jizhi.tools.publish import publish_version
    if idle:
        priority.idle()
    try:
        final = publish_version(version_dir, models_dir,
                                progress=None if quiet else (lambda label, total: ProgressBar(label, total, True)))
    except FileExistsError as e:
        raise refused(f"{e} exists already (a version is published once; give the new one another version)")
    except BundleError as e:
        raise refused(str(e))
    except OSError as e:
        raise refused(f"{e.filename or models_dir}: {e.strerror}")
    click.echo(f"published {final}")


# -- import: an ONNX model with its embedding tables -> a bundle version (offline) ----

@click.command("import")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--fields", "fields_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="FIELDS.toml: which graph inputs are the dense features and each sparse field's ids.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="The bundle version directory to write, <models>/<name>/<version> (must not exist).")
@click.option("--name", default=None, help="Model name in the manifest [default: MODEL's file stem].")
@click.option("--version", type=click.IntRange(min=1), default=1, show_default=True,
              help="Version in the manifest (jizhid wants it to match the directory name).")
@click.option("--profiles", "profiles_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Copy these profiles (a directory holding users/ and items/ in the bundle format) "
                   "instead of generating random ones.")
@click.option("--users", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Users to generate (without --profiles).")
@click.option("--items", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Items to generate (without --profiles).")
@click.option("--seed", default=1, show_default=True, help="Seed of the generated profiles and of the check's pairs.")
@click.option("--hash-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The signature hash's seed (manifest hash_seed).")
@click.option("--check-pairs", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Random (user, item) pairs scored by jizhi and by the original model.")
def import_command(model, fields_path, out_dir, name, version, profiles_dir, users, items, seed, hash_seed,
                   check_pairs):
    """Import MODEL.onnx, a DLRM-style model holding its embedding tables, as a bundle version.

    Every table (an initializer read by a Gather on axis 0, pooled by
    ReduceSum/ReduceMean over the bag axis, or by the Loop torch.onnx.export
    writes for nn.EmbeddingBag with mode sum or mean) moves into the LMDB
    cube: row v under the signature of raw value v + 1 (raw value 0 means
    missing). The graph is rewritten to take jizhi's inputs (dense,
    user_emb, item_emb, user_index) and return score [P]. Profiles are
    generated (or copied with --profiles). Then random pairs are scored by
    jizhi's own stages and by the original model on the same ids; the
    version is renamed into place only when every score agrees within
    1e-5 + 1e-5 * |original|. Weights in an external data file next to
    MODEL are read. docs/formats.md, "Importing a model", has the details.

    \b
    FIELDS.toml, for example:
      output = "prob"            # the score output (default: the only output)
      [dense]                    # optional; the dense features are per user
      input = "dense_x"          # float32 [B, N]
      [[fields]]                 # one per sparse field, in column order
      name = "u_cat"             # file names in profiles/ use it
      side = "user"              # user | item
      kind = "onehot"            # onehot | multihot | history
      input = "u_cat"            # padded ids: int64 [B] or [B, max_len]
      [[fields]]
      name = "u_tags"
      side = "user"
      kind = "multihot"
      max_len = 5
      input = "u_tags"           # int64 [B, 5]
      padding_idx = 0            # short bags are padded with row 0 (a zero row)
      [[fields]]
      name = "i_tags"
      side = "item"
      kind = "multihot"
      max_len = 8
      indices = "tags_indices"   # EmbeddingBag: flat ids [N]
      offsets = "tags_offsets"   # bag starts [B] (or [B+1], include_last_offset)
    (optional per field: id = N, the field id hashed into signatures;
    default its position in the file)

    \b
    Example:
      jizhictl import dlrm.onnx --fields fields.toml --out models/dlrm/1

    Exit codes: 0 imported and checked; 2 usage error, or refused (the
    message names the FIELDS.toml entry, the graph input or the node and
    op type), or the check failed. A refused or failed import writes
    nothing to --out.
    """
    from jizhi.tools.importer import import_model
    if os.path.lexists(out_dir):
        raise click.BadParameter(f"{out_dir} exists already (a version is written into a new directory)",
                                 param_hint="--out")
    try:
        import_model(model, fields_path, out_dir, name=name, version=version, users=users, items=items, seed=seed,
                     hash_seed=hash_seed, profiles=profiles_dir, check_pairs=check_pairs,
                     log=click.echo)
    except (BundleError, FileExistsError) as e:
        raise refused(str(e))


# -- profiles -----------------------------------------------------------------

@click.group()
def profiles():
    """User and item profiles: build a snapshot from a team's files, publish it into a store, list a store."""


@profiles.command("build")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="A model version directory: its manifest says the fields, their kinds, max_len, tables and hashing.")
@click.option("--users", type=click.Path(dir_okay=False), default=None,
              help="The users' file: .parquet, .csv, .jsonl or .npz, one row per user.")
@click.option("--items", type=click.Path(dir_okay=False), default=None,
              help="The items' file: .parquet, .csv, .jsonl or .npz, one row per item.")
@click.option("--spec", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML: the id and dense columns, and per field its column, first_row, missing values and "
                   "CSV separator (default: columns named as the fields, values already raw).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="The snapshot directory to write (users/, items/, profiles.toml); must not exist.")
@click.option("--store", type=click.Path(file_okay=False), default=None,
              help="Publish into this profile store instead: the next snapshot STORE/N; a side not given is "
                   "carried over (hard-linked) from the newest snapshot. Serving versions that read the store "
                   "switch to it at a batch boundary.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Rows read and checked at a time (memory stays bounded for any file size).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--idle/--no-idle", default=True, show_default=True,
              help="Run at the idle CPU and I/O priority (SCHED_IDLE): on a serving machine the build takes only the CPU "
                   "jizhid leaves (measured: p99 3.6x steady during a build at normal priority).")
@click.option("--pace", type=click.FloatRange(0, 1, min_open=True), default=priority.COMMAND_PACE[("profiles", "build")],
              show_default=True,
              help="Run SHARE of the time, stopped for the rest of every 20 ms (bin/jizhictl runs the command as a "
                   "paced child), e.g. 0.25 beside a loaded server: its kernel work (file reads, page faults) is "
                   "spread thin; the build takes about 1/SHARE as long. 1: not paced.")
def profiles_build(model_dir, users, items, spec, out, store, chunk_rows, force, quiet, idle, pace):
    """Build a profile snapshot from Parquet, CSV, JSON lines or numpy .npz files.

    Each file has one row per entity: an id column and one column per field
    of the model (a bag is a list column; in CSV a cell of values separated
    by the field's sep), the users' file also the dense features. The
    team's values are mapped to the model's raw values as the spec declares
    (first_row: the value of the table's first row; missing: the values
    that mean missing). Every row is checked; the first bad one stops the
    build with its file, line or row, column and reason, and nothing is
    written. The result is the columnar snapshot of docs/formats.md:
    copy it into a version's profiles/ or give it to jizhictl import
    --profiles.

    \b
    SPEC.toml, for example:
      [users]
      id = "user_id"
      dense = ["age", "ctr_7d"]        # or one list column: dense = "dense"
      [users.fields.u_city]
      column = "city"
      first_row = 0                    # the team's rows start at 0
      missing = [-1]
      [items.fields.i_tags]
      sep = "|"                        # CSV: "3|17|42"

    \b
    Example:
      jizhictl profiles build --model models/dlrm/1 --users users.parquet \\
          --items items.csv --spec spec.toml --out snapshots/2026-12-07

    Exit codes: 0 built; 2 usage error or a bad input (one line names it).
    """
    from jizhi.ctl.progress import ProgressBar
    from jizhi.tools.profilebuild import build_profiles
    if idle:
        priority.idle()      # before numba's or arrow's threads start
    try:
        rows = build_profiles(model_dir, out, users=users, items=items, spec=spec, chunk_rows=chunk_rows,
                              progress=None if quiet else (lambda label, total: ProgressBar(label, total, True)),
                              force=force, store=store)
    except BundleError as e:
        raise refused(str(e))
    except OSError as e:       # a full disk, a store not writable, ...: one line, nothing published
        raise refused(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except Exception as e:
        if not type(e).__module__.startswith("pyarrow"):
            raise
        raise refused(f"pyarrow could not read the input: {e}")
    what = f"snapshot {rows['snapshot']} of {store} ({rows['path']})" if store else rows["path"]
    click.echo(f"built {what}: " + ", ".join(f"{rows[k]:,} {k}" for k in ("users", "items") if k in rows))


@profiles.command("list")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--models", "models_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A models directory: say which of its versions read the store, and which snapshot each takes.")
def profiles_list(store, models_dir):
    """The snapshots of profile store STORE, newest last, and the model versions that read it.

    A version reads a store when its manifest has [profiles] store = "DIR"
    (a relative DIR: relative to the models directory); it serves the newest
    snapshot that fits it (the same hashing, fields, kinds, max_len and
    tables), switching at a batch boundary when a new one is published.
    """
    from jizhi.bundle import Bundle
    from jizhi.profilestore import newest_fitting, read_manifest, snapshots
    numbers = snapshots(store)
    if not numbers:
        raise refused(f"{store}: no complete snapshot (a snapshot is STORE/N with its profiles.toml)")
    for n in numbers:
        try:
            m = read_manifest(os.path.join(store, str(n)))
        except BundleError as e:
            click.echo(f"{n:>6}  unreadable: {e}")
            continue
        rows = m.get("rows", {})
        carried = m.get("carried", {})
        note = "".join(f", {side} carried over" for side in carried)
        click.echo(f"{n:>6}  {m.get('built', '?')}  {rows.get('users', 0):,} users, {rows.get('items', 0):,} items"
                   f"  (built for {m.get('model')} version {m.get('model_version')}{note})")
    if models_dir is None:
        return
    real = os.path.realpath(store)
    readers = 0
    for name in sorted(os.listdir(models_dir)):
        base = os.path.join(models_dir, name)
        if not os.path.isdir(base):
            continue
        for v in sorted((d for d in os.listdir(base) if d.isdigit()), key=int):
            try:
                b = Bundle(os.path.join(base, v))
            except BundleError:
                continue
            if b.profile_store is None or os.path.realpath(b.profile_store) != real:
                continue
            readers += 1
            found, refused_ = newest_fitting(b.profile_store, b)
            took = f"snapshot {found[0]}" if found else "no snapshot fits"
            click.echo(f"read by {name} version {v}: {took}"
                       + "".join(f"; snapshot {k} does not fit ({why})" for k, why in refused_))
    if not readers:
        click.echo(f"no version in {models_dir} reads this store")


@profiles.command("push")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="A model version directory: its users (its own profiles, or its store's newest snapshot that "
                   "fits) are pushed, in its row layout.")
@click.argument("url")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def profiles_push(model_dir, url, quiet):
    """Load every user row of a snapshot into Redis, at redis://HOST:PORT[,...]/NAME.

    A pipeline whose data_reader stage says user_rows = "redis://.../NAME"
    then reads its users' rows there, in front of the snapshot, and a row
    changed there (jizhictl profiles set, or a team's own writes: the format
    is in docs/formats.md, "User rows on Redis") changes that user's next
    score. The layout record is written last: readers never see rows that
    are not all there.

    \b
    Example:
      jizhictl profiles push --model models/demo/1 redis://10.0.0.5:7000/demo-users

    Exit codes: 0 pushed; 2 usage error, the cluster unreachable or a write refused (one line says which).
    """
    from jizhi.bundle import Bundle
    from jizhi.ctl.progress import ProgressBar
    from jizhi.tools.profilepush import push_users
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = ProgressBar("users", total, not quiet)
        bar.advance(done - bar.done)
    try:
        doc = push_users(url, Bundle(model_dir), progress=progress)
    except (BundleError, ValueError, LookupError, ConnectionError, RuntimeError) as e:
        raise refused(str(e))
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"pushed {doc['keys']:,} user rows ({doc['dim'] * 4} bytes each"
               + (f", snapshot {doc['snapshot']}" if doc.get("snapshot") else "") + f") to {url}")


@profiles.command("set")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="A model version that reads these rows: its fields check the features.")
@click.argument("url")
@click.argument("user", type=click.IntRange(min=0, max=2 ** 64 - 1))
@click.argument("features")
def profiles_set(model_dir, url, user, features):
    """Change one user's row in Redis: FEATURES is JSON, as a request's "features".

    The fields given replace the user's (raw values: an integer or a list),
    "dense" the dense features; the others stay as the row in Redis has
    them (or the snapshot, for a user not there yet). Serving workers see
    the change at the user's next request once their local cache's ttl_ms
    (default 1,000 ms) has passed.

    \b
    Example:
      jizhictl profiles set --model models/demo/1 redis://10.0.0.5:7000/demo-users 42 '{"u_city": 7}'
    """
    from jizhi.bundle import Bundle
    from jizhi.tools.profilepush import write_user
    try:
        given = json.loads(features)
    except json.JSONDecodeError as e:
        raise refused(f"FEATURES is not JSON: {e}")
    if not isinstance(given, dict):
        raise refused('FEATURES must be a JSON object, e.g. {"u_city": 7, "dense": [...]}')
    try:
        row = write_user(url, user, Bundle(model_dir), given)
    except (BundleError, ValueError, LookupError, ConnectionError, RuntimeError, OSError) as e:
        raise refused(str(e))
    click.echo(json.dumps({"user": user, "row": row}))


# -- shed train, cube bench: subcommands of the ctl's groups -----------------------

@click.command("train")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A recorded trace (jizhictl record, or jizhictl demo trace).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), required=True,
              help="The model version that scores it offline.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The policy file to write (JSON).")
@click.option("--top-k", default=10, show_default=True, help="The top-K whose quality the policy protects.")
def shed_train(trace_path, bundle, out, top_k):
    """Fit the learned pruning policy on a trace, scored fully offline.

    For every request: the smallest cutoff (its best candidates by recall
    score) that keeps its whole model top-K; a small model learns that need
    from the request's recall-score statistics. Prints the quality (top-K
    overlap) of the rule and of the learned policy at the same mean fraction
    kept, on the trace and on a held-out quarter of it. Use it with
    `jizhictl shed set --policy FILE` or shed.policy_file.
    """
    from jizhi.shedding import save_policy
    from jizhi.tools.shedtrain import train
    trace = Trace(trace_path)
    bar = {"last": 0}

    def progress(done, total):
        if done - bar["last"] >= total / 20 or done == total:
            bar["last"] = done
            click.echo(f"\rscoring the trace offline: {done}/{total} requests", nl=done == total, err=True)

    doc, report = train(trace, resolve_bundle(bundle), top_k=top_k, progress=progress)
    save_policy(doc, out)
    click.echo(f"policy: {out} (held-out R^2 of the log need {report['held_out_r2_log_need']}; "
               f"a request needs {100 * report['mean_needed_fraction']:.1f} % of its candidates on average, "
               f"median {100 * report['median_needed_fraction']:.1f} %)")
    click.echo(f"{'quota':>6} {'subset':<9} {'rule kept':>9} {'overlap':>8} {'learned kept':>12} {'overlap':>8}")
    for q in report["quality"]:
        click.echo(f"{q['quota']:6.2f} {q['subset']:<9} {q['rule']['kept']:9.3f} {q['rule']['overlap']:8.4f} "
                   f"{q['learned']['kept']:12.3f} {q['learned']['overlap']:8.4f}")


@click.command("bench")
@click.option("--cube", "cube_dir", type=click.Path(exists=True, file_okay=False),
              help="A cube directory: keys are drawn uniformly from it.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False),
              help="A bundle (version, model or demo directory): keys are drawn with its trace's skew. "
                   "Default: ~/.cache/jizhi/demo (make it with `jizhictl demo init ~/.cache/jizhi/demo`).")
@click.option("--batch", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Distinct keys per lookup batch.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0.01), default=3.0, show_default=True,
              help="Seconds timed per method (after a warm-up).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed slices per method; the median is reported.")
@click.option("--keys", "key_draw", type=click.Choice(["trace", "uniform"]), default="trace", show_default=True,
              help="Draw keys by the trace's skew (needs a bundle) or uniformly.")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
              help="The trace to weight keys by (default: one generated from the bundle).")
@click.option("--requests", type=click.IntRange(min=1), default=500, show_default=True,
              help="Requests of the generated trace (500 candidates each).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def cube_bench(cube_dir, bundle, batch, duration_s, repeats, key_draw, trace_path, requests, as_json):
    """Storage micro-benchmark: keys/s per core of the hot tier, the LMDB cube (Numba reader and liblmdb),
    a Python dict and an in-RAM numpy gather, on the same batches of sorted unique keys.

    One process, one thread; run it on a quiet machine (docs/benchmarks.md,
    "Storage micro-benchmarks"). Makes a hot-tier segment in /dev/shm and
    unlinks it as soon as it is mapped.
    """
    if cube_dir and bundle:
        raise click.UsageError("give --cube or --bundle, not both")
    if not cube_dir and not bundle:
        default = Path.home() / ".cache" / "jizhi" / "demo"
        if not default.is_dir():
            raise click.UsageError(f"give --cube or --bundle (no demo at {default}: "
                                   f"`jizhictl demo init {default}` makes one)")
        bundle = str(default)
    from jizhi.cube.build import TableError
    from jizhi.tools import cubebench
    try:
        r = cubebench.run(cube=cube_dir, bundle=bundle, batch=batch, duration_s=duration_s, repeats=repeats,
                          draw=key_draw, trace_path=trace_path, requests=requests,
                          log=lambda s: click.echo(s, err=True))
    except TableError as e:
        raise click.BadParameter(str(e), param_hint="--cube/--bundle")
    click.echo(json.dumps(r, indent=2) if as_json else "\n".join(cubebench.format_report(r)))


cli.add_command(demo)
cli.add_command(import_command, "import")
cli.add_command(publish_command, "publish")
cli.add_command(profiles)
cli.add_command(bench_command, "bench")
cli.add_command(bench_reload_command, "bench-reload")
cli.add_command(shape_command, "bench-shape")
cli.add_command(tune_command)
shed.add_command(shed_train, "train")
cube.add_command(cube_bench, "bench")


def main(argv=None):
    """jizhictl, the whole CLI: the ctl's commands and the tools'. Its exit code."""
    return run(cli, argv)
