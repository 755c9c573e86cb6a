"""bench/cpu_rows.sh: ours and the torch step, pinned to the cores CPUSETS names."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cpusets_pin_both_steps_and_name_the_rows(tmp_path):
    one_core = str(min(os.sched_getaffinity(0)))
    env = os.environ | {
        "PY": sys.executable,
        "OUT": str(tmp_path),
        "SHAPES": "tiny",
        "ALGOS": "grpo",
        "ROUNDS": "1",
        "STEPS_tiny": "1",
        "CPUSETS": one_core,
        "DEADLINE_S": "600",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "cpu_rows.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["row"] for r in rows] == [
        f"ours_grpo_tiny_cpus{one_core}",
        f"torch_grpo_tiny_cpus{one_core}",
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["cpus"] == 1 and row["step_s"] > 0
    # torch's intra-op pool follows the pinning, not the machine's core count.
    assert rows[1]["torch_threads"] == 1
    assert (tmp_path / "cpu_rows.jsonl").read_text().count("\n") == 2
