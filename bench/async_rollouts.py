"""On-policy vs one-step-ahead rollouts (`rollout.async_steps` 0 vs 1): wall time per step and
the held-out score after the same number of steps. Prints one JSON object.

    .venv/bin/python bench/async_rollouts.py --engine vllm --steps 40 --rounds 2

Each round trains once per mode in a fresh process, alternating which mode goes first, so a
machine that gets busier or quieter during the benchmark biases neither. A step's time is
`time/step_s` of the run's metrics (rollout + verify + train + weight update); the first step
(compilation, worker warm-up) is left out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def train_command(config: str, run_dir: pathlib.Path, mode: int, args: argparse.Namespace):
    arg = f"total_steps={args.steps},eval_every={args.steps},seed={args.seed}"
    return [
        sys.executable, str(REPO / "scripts" / "train.py"), f"--config={config}:{arg}",
        f"--config.run_dir={run_dir}", f"--config.rollout.engine={args.engine}",
        f"--config.rollout.async_steps={mode}", *[f"--config.{kv}" for kv in args.set],
    ]  # fmt: skip


def run_figures(run_dir: pathlib.Path) -> dict:
    """Median step time (steps 2..), time waiting on the rollouts, held-out score at the end."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_s" in r and r["step"] > 1]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    end = {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
    return {
        "step_s_median": statistics.median(r["time/step_s"] for r in steps),
        "steps_s_total": sum(r["time/step_s"] for r in steps),
        "rollout_s_median": statistics.median(r["time/rollout_s"] for r in steps),
        "train_s_median": statistics.median(r["time/train_s"] for r in steps),
        "rollout_wait_s_median": statistics.median(
            r.get("time/rollout_wait_s", 0.0) for r in steps
        ),
        "staleness_max": max(r["rollout/staleness"] for r in steps),
        "eval_end": end,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sc_sdpo.py")
    parser.add_argument("--engine", choices=("vllm", "jax"), default="vllm")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="run folders (kept)")
    args = parser.parse_args(argv)
    if args.steps < 3 or args.rounds < 1:
        parser.error("--steps must be >= 3 (step 1 is left out) and --rounds >= 1")
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="jaxsd-async-"))
    runs: dict[int, list[dict]] = {0: [], 1: []}
    for r in range(args.rounds):
        for mode in (0, 1) if r % 2 == 0 else (1, 0):
            run_dir = out / f"round{r}_async{mode}"
            print(f"[bench] round {r + 1}/{args.rounds} async_steps={mode}", file=sys.stderr)
            cmd = train_command(args.config, run_dir, mode, args)
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"bench/async_rollouts.py: {' '.join(cmd)} failed")
            runs[mode].append(run_figures(run_dir))
    sync = statistics.median(f["step_s_median"] for f in runs[0])
    ahead = statistics.median(f["step_s_median"] for f in runs[1])
    print(json.dumps({
        "config": args.config, "engine": args.engine, "steps": args.steps,
        "rounds": args.rounds, "set": args.set, "speedup_step_time": sync / ahead,
        "sync": runs[0], "async": runs[1], "run_dirs": str(out),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
