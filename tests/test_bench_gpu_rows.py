"""bench/gpu_rows.py: a rows file with a line that is not JSON still summarises, the bad line
reported as an error row (an H100 run once crashed the summary on a raw carriage return)."""

from __future__ import annotations

import json


def test_an_unparsable_line_becomes_an_error_row(repo_module, tmp_path):
    gpu_rows = repo_module("bench/gpu_rows.py")
    good = {"row": "matmul_bf16", "bench": "matmul_peak", "n": 8192, "dtype": "bfloat16",
            "tflops": 698.2, "nominal_tflops": 989.0, "fraction_of_nominal": 0.706}  # fmt: skip
    broken = '{"row": "rollout_0.6b", "error": "exit 1", "stderr_tail": "Loading\rweights"}'
    path = tmp_path / "rows.jsonl"
    path.write_text("== header\n" + json.dumps(good) + "\n" + broken + "\n")
    rows = gpu_rows.load(path)
    assert rows[0] == good
    assert rows[1]["row"] == "rows.jsonl line 3"
    assert rows[1]["error"].startswith("not JSON (")
    lines = gpu_rows.other_lines(rows)
    assert any(line.startswith("- rows.jsonl line 3: not JSON") for line in lines)
    assert any("698 TFLOP/s" in line for line in lines)
