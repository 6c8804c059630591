"""jizhid's command line: parse arguments, then run the supervisor.

``jizhid --demo`` serves the demo bundle (created on first use under
``--demo-dir``) on tcp://127.0.0.1:5555 with no other set-up;
``jizhid --config FILE`` is for real use; ``jizhid --check-config`` prints the
settings reference and checks everything a start would (jizhi/preflight.py).
"""
import argparse
import logging
import os
import sys
from pathlib import Path

from jizhi import config, logs
from jizhi.errors import BundleError, ConfigError, PipelineError, RunDirError, ShmFull


def default_demo_dir():
    base = os.environ.get("STATE_DIRECTORY") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jizhi")
    return Path(base) / "demo"


def version():
    """The installed package's version: the source jizhictl --version reads (click's package_name)."""
    from importlib import metadata
    try:
        return metadata.version("jizhi")
    except metadata.PackageNotFoundError:
        from jizhi import __version__
        return __version__


def parse(argv):
    ap = argparse.ArgumentParser(
        prog="jizhid",
        description="jizhi daemon: serves recommendation models over ZeroMQ. It starts a broker and "
                    "stage worker processes, keeps them alive, and stops cleanly on SIGTERM.",
        epilog="Examples:\n  jizhid --demo                    serve the demo bundle on tcp://127.0.0.1:5555\n"
               "  jizhid --config /etc/jizhi/jizhi.toml\n  jizhid --check-config --config FILE\n\n"
               "Exit codes: 0 stopped cleanly on SIGTERM/SIGINT (--check-config: nothing would fail); 2 it cannot\n"
               "start, one line each saying why: a usage error, the config, a pipeline, the model directory, the\n"
               "run directory, another jizhid of the instance, /dev/shm (--check-config also: an address in use);\n"
               "130 interrupted (Ctrl-C) before it served.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s, version {version()}",
                    help="print the version (the installed package's, as jizhictl --version says it) and exit")
    ap.add_argument("--config", help="jizhi.toml (settings: jizhid --check-config prints them)")
    ap.add_argument("--demo", action="store_true",
                    help="serve the demo bundle, creating it first in --demo-dir if it is not there")
    ap.add_argument("--demo-dir", type=Path, default=None,
                    help="where the demo bundle lives (default: $STATE_DIRECTORY or ~/.cache/jizhi, /demo)")
    ap.add_argument("--pipelines", help="comma-separated pipelines to serve (overrides server.pipelines; "
                                        "the first is the default)")
    ap.add_argument("--frontend", help="client endpoint (overrides server.frontend)")
    ap.add_argument("--instance", help="instance name (overrides server.instance)")
    ap.add_argument("--models", help="model directory (overrides server.models)")
    ap.add_argument("--run-dir", help="run directory (overrides server.run_dir)")
    ap.add_argument("--check-config", action="store_true",
                    help="print the settings reference, then check everything a start with these options would: "
                         "config, pipelines (read and compiled), model versions (verified), run directory, "
                         "instance, frontend and metrics addresses, /dev/shm; each problem on one line, exit 2")
    return ap.parse_args(argv)


def check_config(sup, config_path, demo_to_create):
    """``--check-config``: the settings reference on stdout, then every problem a start would meet, one line
    each on stderr (exit 2), or what was checked and ``config OK`` (exit 0)."""
    from jizhi.preflight import check
    print(config.describe())
    logging.getLogger().setLevel(logging.WARNING)   # the start's own info lines are not the answer here
    problems, facts = check(sup, demo_to_create)
    for p in problems:
        print(f"jizhid: {p}", file=sys.stderr)
    if problems:
        return 2
    print("\nchecked: " + "; ".join(facts))
    print(f"config OK: {config_path or '(defaults)'}")
    return 0


def main(argv=None):
    try:
        return _main(argv)
    except KeyboardInterrupt:   # Ctrl-C before it serves (creating the demo bundle, say); serve() handles its own
        print("jizhid: interrupted before it served; nothing of it runs", file=sys.stderr)
        return 130


def _main(argv):
    args = parse(argv)
    logs.setup()
    log = logging.getLogger("jizhi.daemon")
    overrides = {}
    for flag, key in (("frontend", "server.frontend"), ("instance", "server.instance"),
                      ("models", "server.models"), ("run_dir", "server.run_dir")):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    if args.pipelines:
        overrides["server.pipelines"] = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    try:
        settings = config.load(args.config, overrides)
    except ConfigError as e:
        print(f"jizhid: {e}", file=sys.stderr)
        return 2
    models = settings["server.models"]
    demo_to_create = None
    if args.demo:
        demo_dir = args.demo_dir or default_demo_dir()
        if not (demo_dir / "models" / "demo").is_dir():
            if args.check_config:
                demo_to_create = demo_dir
            else:
                from jizhi.tools.demo import init_demo
                log.info("creating the demo bundle in %s", demo_dir)
                try:
                    init_demo(demo_dir)
                except OSError as e:
                    print(f"jizhid: cannot create the demo bundle in {demo_dir}: {e.strerror} "
                          f"({e.filename or demo_dir}); pass --demo-dir", file=sys.stderr)
                    return 2
        models = models or str(demo_dir / "models")
    if not models and not args.check_config:
        print("jizhid: no model directory: set server.models in the config, pass --models, or use --demo",
              file=sys.stderr)
        return 2
    from jizhi.rundir import InstanceBusy
    from jizhi.supervisor.arbiter import Supervisor
    if models != settings["server.models"]:
        overrides["server.models"] = models
        settings["server.models"] = models
    sup = Supervisor(settings, models, settings["server.pipelines"], config_path=args.config, overrides=overrides)
    if args.check_config:
        return check_config(sup, args.config, demo_to_create)
    try:
        sup.prepare()
    except (PipelineError, BundleError, InstanceBusy, RunDirError, ShmFull) as e:
        print(f"jizhid: {e}", file=sys.stderr)
        sup.cleanup()
        return 2
    except OSError as e:    # a file of the model directory unreadable, say: one line, as above
        print(f"jizhid: {e.filename or models}: {e.strerror}", file=sys.stderr)
        sup.cleanup()
        return 2
    except BaseException:
        sup.cleanup()
        raise
    try:
        return sup.serve()
    finally:
        sup.cleanup()
