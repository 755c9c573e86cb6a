"""Compare methods over seeds on one preset: pass-rate and held-out curves in one PNG each.

python scripts/compare.py --methods sc_sdpo,sdpo,grpo --seeds 0,1,2 --out runs/compare
python scripts/compare.py --mode miniature --out runs/miniature   # docs/miniature.md

`--mode miniature` trains the 8 methods x 5 seeds of docs/miniature.md on the `miniature`
preset (unless --methods / --seeds narrow it), then writes one figure per band, table.md
(mean ± std per band, and each predicted ordering's paired difference with its 95 % interval)
and summary.json. A rerun skips the runs that finished and resumes an interrupted one.
"""

import argparse
import json

from jaxsd.train import miniature
from jaxsd.train.compare import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="plain", choices=("plain", "miniature"))
    parser.add_argument("--methods", default="", help="default: sc_sdpo,sdpo,grpo (miniature: 8)")
    parser.add_argument("--seeds", default="", help="default: 0,1,2 (miniature: 0-4)")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--preset", default=None, help="config preset ('' = embedded default)")
    parser.add_argument("--metric", default="eval/mean@16", help="held-out metric to compare")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override for every run, e.g. --set total_steps=20",
    )  # fmt: skip
    args = parser.parse_args()
    mini = args.mode == "miniature"
    methods = args.methods or (",".join(miniature.METHODS) if mini else "sc_sdpo,sdpo,grpo")
    seeds = args.seeds or (",".join(map(str, miniature.SEEDS)) if mini else "0,1,2")
    preset = args.preset if args.preset is not None else ("miniature" if mini else "")
    overrides = dict(item.split("=", 1) for item in args.set)
    summary = compare(
        methods.split(","),
        [int(s) for s in seeds.split(",")],
        args.out,
        preset=preset,
        overrides=overrides,
        metric=args.metric,
    )
    print(json.dumps(summary["methods"], indent=2))
    print(f"plots: {summary['plot_pass_rate']} {summary['plot_eval']}")
    if mini:
        report = miniature.write_report(summary, args.out, methods.split(","))
        print(open(report["table"]).read())
        print("figures:", " ".join(report["figures"].values()))


if __name__ == "__main__":
    main()
