"""Compare methods over seeds on one preset: pass-rate and held-out curves in one PNG each.

python scripts/compare.py --methods sc_sdpo,sdpo,grpo --seeds 0,1,2 --out runs/compare
"""

import argparse
import json

from jaxsd.train.compare import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="sc_sdpo,sdpo,grpo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--preset", default="", help="config preset ('' = embedded default)")
    parser.add_argument("--metric", default="eval/mean@16", help="held-out metric to compare")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override for every run, e.g. --set total_steps=20",
    )  # fmt: skip
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    summary = compare(
        args.methods.split(","),
        [int(s) for s in args.seeds.split(",")],
        args.out,
        preset=args.preset,
        overrides=overrides,
        metric=args.metric,
    )
    print(json.dumps(summary["methods"], indent=2))
    print(f"plots: {summary['plot_pass_rate']} {summary['plot_eval']}")


if __name__ == "__main__":
    main()
