"""bench/topk.py: the top-k benchmark checks its variants against lax.top_k and reports them;
bench/gpu_rows.py turns its row into a summary line."""

from __future__ import annotations

import json


def test_topk_bench_reports_the_default_width_and_every_width(run_repo_script, repo_module):
    proc = run_repo_script(
        "bench/topk.py",
        "--rows",
        "8",
        "--vocab",
        "3000",
        "--k",
        "20",
        "--widths",
        "4",
        "50",
        "--reps",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["default_width"] == 16  # sqrt(3000 / 20) = 12.2 -> 16
    assert set(row["ms"]) == {"lax.top_k", "default (w 16)", "w 4", "w 50"}
    assert all(ms > 0 for ms in row["ms"].values())
    summary = repo_module("bench/gpu_rows.py").other_lines([{"row": "topk", **row}])
    assert summary[0].startswith("- top-k 8 × 3,000, k 20 (ms): lax.top_k ")


def test_topk_bench_rejects_k_above_vocab(run_repo_script):
    proc = run_repo_script("bench/topk.py", "--vocab", "10", "--k", "11")
    assert proc.returncode == 2
    assert "--k 11 exceeds --vocab 10" in proc.stderr
