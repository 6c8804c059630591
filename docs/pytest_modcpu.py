"""A pytest plugin: the CPU each test module costs, its processes' and their children's.

docs/benchmarks.md, "Start-up", used it to find where the suite's time went:

    PYTHONPATH=docs python -m pytest -q -p pytest_modcpu -m ""      # writes modcpu.txt

CPU is this process's user + system time plus that of the children it waited for
(jizhid and, through it, every process of a daemon), so a module-scoped daemon is
counted in the module that stops it. Run it without -n (xdist workers would each
write the file). Rows: CPU seconds, wall seconds, module; most CPU first.
"""
import os
import resource
import time

_state = {}
_rows = []


def _cpu():
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _close_module():
    if "module" in _state:
        _rows.append((_state["module"], _cpu() - _state["cpu"], time.monotonic() - _state["wall"]))


def pytest_runtest_protocol(item, nextitem):
    module = item.nodeid.split("::")[0]
    if _state.get("module") != module:
        _close_module()
        _state.update(module=module, cpu=_cpu(), wall=time.monotonic())


def pytest_sessionfinish(session):
    _close_module()
    path = os.environ.get("MODCPU_OUT", "modcpu.txt")
    with open(path, "w") as f:
        for module, cpu, wall in sorted(_rows, key=lambda r: -r[1]):
            f.write(f"{cpu:8.1f} cpu {wall:8.1f} wall  {module}\n")
        f.write(f"{sum(r[1] for r in _rows):8.1f} cpu {sum(r[2] for r in _rows):8.1f} wall  TOTAL\n")
