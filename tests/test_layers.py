"""The import layers (issue 18; docs/architecture.md, "Layers"): imports go one way, from the bottom up,
and no import cycle joins two files. import-linter checks the contracts of setup.cfg's [importlinter]
sections. The project's three directories are one package once installed (``jizhi``, ``jizhi.workers`` =
``workers/``, ``jizhi.cube`` = ``cube/``, setup.cfg's package_dir), which import-linter cannot follow, so
the test lays a copy of them out that way and points the linter at it."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def installed_layout(dest):
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    shutil.copytree(ROOT / "jizhi", dest / "jizhi", ignore=skip)
    shutil.copytree(ROOT / "workers", dest / "jizhi" / "workers", ignore=skip)
    shutil.copytree(ROOT / "cube", dest / "jizhi" / "cube", ignore=skip)
    return dest


def lint_imports(src):
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([os.fspath(lint), "--config", os.fspath(ROOT / "setup.cfg"), "--no-cache"],
                          cwd=src.parent, env={**os.environ, "PYTHONPATH": os.fspath(src)},
                          capture_output=True, text=True, timeout=300)


def test_imports_follow_the_layers_and_no_file_imports_another_in_a_cycle(tmp_path):
    src = installed_layout(tmp_path / "src")
    r = lint_imports(src)
    print(r.stdout)     # the linter's report (.ci/run shows it with -rA)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout


@pytest.mark.parametrize("module, line, broken", [
    # a stage processor that imports the broker breaks the layers contract
    ("workers/noop.py", "import jizhi.broker.core", "jizhi.workers.noop -> jizhi.broker.core"),
    # two modules of the cube that import each other break the acyclic contract
    ("cube/backend.py", "import jizhi.cube.redis", "No import cycle between two files"),
], ids=["an import against the layers", "a cycle between two files"])
def test_the_check_can_fail(tmp_path, module, line, broken):
    src = installed_layout(tmp_path / "src")
    with open(src / "jizhi" / module, "a") as f:
        f.write(f"\n{line}  # noqa: E402,F401\n")
    r = lint_imports(src)
    assert r.returncode == 1, r.stdout + r.stderr
    assert broken in r.stdout and "BROKEN" in r.stdout, r.stdout


def test_the_architecture_page_lists_every_module():
    """docs/architecture.md's tree names every module of jizhi/, workers/ and cube/, and no module that is gone."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    tree = page[page.index("## The tree, one line per module"):]
    listed = set(re.findall(r"^- `((?:jizhi|workers|cube)/[\w/]+\.py)`", tree, re.M))
    modules = {p.relative_to(ROOT).as_posix() for d in ("jizhi", "workers", "cube") for p in (ROOT / d).rglob("*.py")}
    assert modules - listed == set(), "modules missing from docs/architecture.md's tree"
    assert listed - modules == set(), "docs/architecture.md's tree lists modules that do not exist"
