"""The demo at catalogue scale, checked at tiny sizes: the chunked, kernel-drawn and streamed paths that
``init_demo`` takes for millions of users give the very files of the plain ones; ``--vocab-scale``."""
import hashlib
import os
import tomllib

import numpy as np
from click.testing import CliRunner

from jizhi.bundle import Bundle
from jizhi.cube.build import describe
from jizhi.tools.demo import bundle, init_demo, sampling
from jizhi.tools.reference import ReferenceScorer


def test_zipf_kernel_is_searchsorted():
    rng = np.random.default_rng(3)
    for n, exponent in ((1, 1.0), (2, 1.0), (20, 1.1), (5000, 1.0), (100_000, 1.0)):
        cdf = sampling._zipf_cdf(n, exponent)
        m = sampling._guide(cdf).shape[0] - 1
        edges = np.arange(m + 1, dtype=np.float64) / m
        u = np.concatenate([rng.random(200_000), cdf, np.nextafter(cdf, 0), edges[:-1],
                            np.nextafter(edges[1:], 0), [0.0, np.nextafter(1.0, 0)]])
        u = u[(u >= 0) & (u < 1)]
        out = np.empty(u.shape[0], dtype=np.int64)
        sampling._zipf_ranks(cdf, sampling._guide(cdf), u, out)
        assert np.array_equal(out, np.minimum(np.searchsorted(cdf, u, side="right"), n - 1)), n
    cdf = sampling._zipf_cdf(1000, 1.0)
    plain = sampling._zipf_draw(np.random.default_rng(5), cdf, 10_001)
    chunked = np.concatenate(list(sampling._zipf_chunks(np.random.default_rng(5), cdf, 10_001, chunk=777)))
    assert np.array_equal(plain, chunked)


def test_distinct_ids_as_np_unique():
    ids = sampling._distinct_ids(np.random.default_rng([7, 1]), 50_000)
    assert np.array_equal(ids, np.unique(np.random.default_rng([7, 1]).integers(1, 2**63, 50_000, dtype=np.uint64)))


def digests(version_dir):
    out = {}
    for root, _, names in os.walk(version_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), version_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_chunked_paths_write_the_same_bundle(tmp_path, monkeypatch):
    plain = init_demo(tmp_path / "plain", users=400, items=3000, progress=False)
    # Chunks of 64 values: every user bag streamed in pieces, every draw of 64 and more through the kernel.
    monkeypatch.setattr(sampling, "_ZIPF_CHUNK", 64)
    monkeypatch.setattr(bundle, "_ZIPF_CHUNK", 64)
    chunked = init_demo(tmp_path / "chunked", users=400, items=3000, progress=False)
    assert digests(plain) == digests(chunked)


def test_vocab_scale(tmp_path):
    from jizhi.tools.commands import cli
    result = CliRunner().invoke(cli, ["demo", "init", str(tmp_path / "d"), "--users", "200", "--items", "1000",
                                       "--vocab-scale", "3"])
    assert result.exit_code == 0, result.output
    vdir = tmp_path / "d" / "models" / "demo" / "1"
    Bundle(vdir).verify()
    with open(vdir / "manifest.toml", "rb") as f:
        vocab = {f["name"]: f["vocab"] for f in tomllib.load(f)["fields"]}
    assert vocab["u_cat0"] == 3000 and vocab["i_multi0"] == 15000 and vocab["i_id"] == 1000 and vocab["u_hist"] == 1000
    scaled = sum(f.vocab for f in bundle._fields(1000, 3) if f.kind != "history" and f.name != "i_id")
    assert 0.99 * scaled + 1000 < describe(vdir / "cube")["keys"] <= scaled + 1000
    scorer = ReferenceScorer(vdir)
    users, items = scorer.profiles["user"]["ids"][:2], scorer.profiles["item"]["ids"][:100]
    scores, unknown = scorer.score_requests(users, np.array([0, 50, 100]), items)
    assert unknown == 0 and np.isfinite(scores).all() and 0 < scores.min() and scores.max() < 1
