"""jizhid's command line: parse arguments, then run the supervisor.

``jizhid --demo`` serves the demo bundle (created on first use under
``--demo-dir``) on tcp://127.0.0.1:5555 with no other set-up;
``jizhid --config FILE`` is for real use; ``jizhid --check-config`` validates
a config and prints the settings reference.
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


def parse(argv):
    ap = argparse.ArgumentParser(
        prog="jizhid",
        description="jizhi daemon: serves recommendation models over ZeroMQ. It starts a broker and "
                    "stage worker processes, keeps them alive, and stops cleanly on SIGTERM.",
        epilog="Examples:\n  jizhid --demo                    serve the demo bundle on tcp://127.0.0.1:5555\n"
               "  jizhid --config /etc/jizhi/jizhi.toml\n  jizhid --check-config --config FILE",
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
                    help="validate the config (and its pipelines), print the settings reference, exit")
    return ap.parse_args(argv)


def main(argv=None):
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
    if args.check_config:
        print(config.describe())
        print(f"\nconfig OK: {args.config or '(defaults)'}")
        return 0
    models = settings["server.models"]
    if args.demo:
        demo_dir = args.demo_dir or default_demo_dir()
        if not (demo_dir / "models" / "demo").is_dir():
            from jizhi.demo import init_demo
            log.info("creating the demo bundle in %s", demo_dir)
            init_demo(demo_dir)
        models = models or str(demo_dir / "models")
    if not models:
        print("jizhid: no model directory: set server.models in the config, pass --models, or use --demo",
              file=sys.stderr)
        return 2
    from jizhi.rundir import InstanceBusy
    from jizhi.supervisor import Supervisor
    if models != settings["server.models"]:
        overrides["server.models"] = models
        settings["server.models"] = models
    sup = Supervisor(settings, models, settings["server.pipelines"], config_path=args.config, overrides=overrides)
    try:
        sup.prepare()
    except (PipelineError, BundleError, InstanceBusy, RunDirError, ShmFull) as e:
        print(f"jizhid: {e}", file=sys.stderr)
        sup.cleanup()
        return 2
    except BaseException:
        sup.cleanup()
        raise
    try:
        return sup.serve()
    finally:
        sup.cleanup()
