"""bench/sandbox.py: prints its JSON, every program's outcome is right, and the loops of the
loop batch are killed at the wall-clock limit (not before)."""

from __future__ import annotations

import json


def test_sandbox_bench_reports_throughput_and_the_loop_batch(run_repo_script):
    done = run_repo_script(
        "bench/sandbox.py", "--trivial", "16", "--batch", "16", "--loops", "2",
        "--timeout", "1", "--repeats", "1", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["loop_batch_outcomes_right"] and out["trivial_programs_per_s"] > 0
    assert out["loop_batch"] == {"programs": 16, "infinite_loops": 2}
    assert out["loop_batch_s"] >= 1.0  # a loop runs until its timeout
    assert isinstance(out["loop_batch_within_timeout_plus_1s"], bool)
