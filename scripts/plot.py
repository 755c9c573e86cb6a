"""Plot run folders: `plot.py RUN` writes RUN/plots/curves.png; several runs + --metric compare.

python scripts/plot.py runs/sc_sdpo_default_1a2b3c4d --smooth 0.6
python scripts/plot.py runs/sc_sdpo runs/grpo --metric eval/mean@16 --out compare.png
"""

import argparse

from jaxsd.plots import plot_run, plot_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--metric", help="compare this metric across the runs (one axis)")
    parser.add_argument("--out", help="PNG path (default: <run>/plots/curves.png for one run)")
    parser.add_argument(
        "--smooth", type=float, default=0.0,
        help="EMA weight in [0, 1) as in TensorBoard (0.6 is its default); raw values stay faded",
    )  # fmt: skip
    args = parser.parse_args()
    if args.metric is None:
        if len(args.run_dirs) != 1:
            parser.error("several run folders need --metric (and --out) to compare them")
        print(plot_run(args.run_dirs[0], args.out, smooth=args.smooth))
        return
    if args.out is None:
        parser.error("--metric needs --out for the comparison PNG")
    print(plot_runs(args.run_dirs, args.out, args.metric, smooth=args.smooth))


if __name__ == "__main__":
    main()
