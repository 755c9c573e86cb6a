"""bench/topk.py: the top-k benchmark checks its variants against lax.top_k and reports them;
bench/gpu_rows.py turns its row into a summary line."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench/topk.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip


def test_topk_bench_reports_the_default_width_and_every_width(repo_module):
    proc = _run("--rows", "8", "--vocab", "3000", "--k", "20", "--widths", "4", "50", "--reps", "1")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["default_width"] == 16  # sqrt(3000 / 20) = 12.2 -> 16
    assert set(row["ms"]) == {"lax.top_k", "default (w 16)", "w 4", "w 50"}
    assert all(ms > 0 for ms in row["ms"].values())
    summary = repo_module("bench/gpu_rows.py").other_lines([{"row": "topk", **row}])
    assert summary[0].startswith("- top-k 8 × 3,000, k 20 (ms): lax.top_k ")


def test_topk_bench_rejects_k_above_vocab():
    proc = _run("--vocab", "10", "--k", "11")
    assert proc.returncode == 2
    assert "--k 11 exceeds --vocab 10" in proc.stderr
