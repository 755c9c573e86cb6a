"""Sandbox throughput: trivial programs per second, and a batch with infinite loops.

Prints one JSON object:
- `trivial_programs_per_s`: a batch of `--trivial` passing one-line programs (each with one
  assert), best of `--repeats`, through `Sandbox.run_many` with `--workers` processes at once;
- `loop_batch_s`: wall time of a batch of `--batch` programs of which `--loops` never end, with
  `--timeout` seconds per program (goal: within timeout + 1 s), and whether each outcome was right.

Usage: .venv/bin/python bench/sandbox.py [--workers 64] [--timeout 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from jaxsd.tasks.sandbox import Job, Sandbox, SandboxLimits

TRIVIAL = Job("def f(x):\n    return x + 1\n", ("assert f(1) == 2",))
LOOP = Job("while True:\n    pass\n", ("assert f(1) == 2",))


def measure(workers: int, timeout: float, trivial: int, batch: int, loops: int,
            repeats: int) -> dict:  # fmt: skip
    """Run both batches; returns the figures printed as JSON."""
    limits = SandboxLimits(timeout_s=timeout)
    with Sandbox(limits, workers=workers) as sb:
        sb.run_many([TRIVIAL] * workers)  # warm the page cache and the thread pool
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = sb.run_many([TRIVIAL] * trivial)
            rates.append(trivial / (time.perf_counter() - t0))
            assert all(r.passed for r in results), [r.reason for r in results if not r.passed]
        # Loops spread through the batch, as a real batch of rollouts would have them.
        jobs = [LOOP if i % (batch // loops) == 0 and i // (batch // loops) < loops else TRIVIAL
                for i in range(batch)]  # fmt: skip
        t0 = time.perf_counter()
        results = sb.run_many(jobs)
        loop_s = time.perf_counter() - t0
    right = all(
        (r.status == "timeout") if job is LOOP else r.passed
        for job, r in zip(jobs, results, strict=True)
    )
    return {
        "workers": workers,
        "timeout_s": timeout,
        "isolation_missing": list(sb.isolation.missing),
        "trivial_programs_per_s": round(max(rates), 1),
        "trivial_programs_per_s_all": [round(r, 1) for r in rates],
        "loop_batch": {"programs": batch, "infinite_loops": loops},
        "loop_batch_s": round(loop_s, 3),
        "loop_batch_within_timeout_plus_1s": loop_s <= timeout + 1.0,
        "loop_batch_outcomes_right": right,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--trivial", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loops", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not 0 < args.loops <= args.batch:
        parser.error(f"--loops={args.loops} must be in [1, --batch={args.batch}]")
    print(json.dumps(measure(args.workers, args.timeout, args.trivial, args.batch, args.loops,
                             args.repeats)))  # fmt: skip


if __name__ == "__main__":
    main()
