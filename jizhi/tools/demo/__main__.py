"""``python -m jizhi.tools.demo head``: write a head bundle on the demo's features (``heads.write_head``).

Runs in the operator's shell; exits 0 with the head's path and the pipeline
stage that serves it, 2 when it refuses (the version exists, a bad name or
width, a base that is not a full bundle).
"""
import argparse
import sys

import jizhi.tools.demo
from jizhi.errors import BundleError
from jizhi.tools.demo.heads import HEAD_HIDDEN, write_head


def _widths(text):
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated layer widths, e.g. 256,128")
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: layer widths must be positive")
    return widths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jizhi.tools.demo",
                                     description=jizhi.tools.demo.__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    h = commands.add_parser(
        "head", help="write a head bundle (dense only) on the demo's features",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a head bundle MODELS/NAME/VERSION: a model that is only a dense graph\n"
                    "(manifest.toml with head = true, and dense.onnx), with no cube and no profiles\n"
                    "of its own. A pipeline serves it on its base model's features: the base's\n"
                    "reader, feature and cube stages compute the pooled embeddings once, and a\n"
                    "model_inference stage naming the head (model = \"NAME\", output = \"NAME\") runs\n"
                    "its graph; the head is versioned and reloaded on its own. Its dim, hash_seed,\n"
                    "[dense] and [[fields]] are copied from the base, which they must equal.\n\n"
                    "The graph is the demo's (bottom MLP, user tower, dot interactions, top MLP,\n"
                    "sigmoid) with top MLP widths --hidden and weights from --seed, its last layer\n"
                    "scaled so logits over pairs of the base's profiles have std 1.")
    h.add_argument("--models", required=True, metavar="DIR", help="the models directory jizhid watches")
    h.add_argument("--name", required=True, help="the head's model name (a directory of MODELS)")
    h.add_argument("--version", type=int, default=1, help="the head's version (default 1)")
    h.add_argument("--base", metavar="DIR", default=None,
                   help="the base model's version directory (default: the newest MODELS/demo/<version>)")
    h.add_argument("--hidden", type=_widths, default=HEAD_HIDDEN, metavar="W,W,...",
                   help="top MLP layer widths: 32 is light, 512,256,128 heavy (default 256,128, the demo's)")
    h.add_argument("--seed", type=int, default=11, help="the dense weights' seed (default 11)")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        path = write_head(args.models, args.name, version=args.version, base=args.base, hidden=args.hidden,
                          seed=args.seed, progress=not args.quiet)
    except FileExistsError as e:
        print(f"python -m jizhi.tools.demo head: {e} exists already (choose another --version)", file=sys.stderr)
        return 2
    except (BundleError, ValueError) as e:
        print(f"python -m jizhi.tools.demo head: {e}", file=sys.stderr)
        return 2
    print(f"head: {path}")
    print(f'a pipeline on its base serves it with a stage:\n  [[stage]]\n  processor = "model_inference"\n'
          f'  model = "{args.name}"\n  output = "{args.name}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
