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


def test_trl_variants_are_paired_with_our_fastest_row_of_the_same_workload(repo_module):
    gpu_rows = repo_module("bench/gpu_rows.py")
    fixed = {"bench": "train_step", "shape": "0.6b", "layers": 28, "batch": 8, "prompt": 128,
             "response": 128, "compute_dtype": "bfloat16"}  # fmt: skip
    rows = [
        fixed | {"row": "ours_cudnn_sdpo_0.6b_fixed", "algorithm": "sdpo",
                 "response_tokens_per_s": 3000.0},
        fixed | {"row": "ours_sdpo_0.6b_fixed", "algorithm": "sdpo",
                 "response_tokens_per_s": 2000.0},
        fixed | {"row": "ours_cudnn_grpo_0.6b_fixed", "algorithm": "grpo",
                 "response_tokens_per_s": 4000.0},
        # Same shape, another workload: never the pair of a fixed-workload TRL variant.
        fixed | {"row": "ours_cudnn_sdpo_0.6b_large", "algorithm": "sdpo", "batch": 16,
                 "response_tokens_per_s": 9000.0},
        # Same workload, depth cut: not comparable with the full-depth peer either.
        fixed | {"row": "ours_cudnn_sdpo_0.6bx4_fixed", "algorithm": "sdpo", "layers": 4,
                 "response_tokens_per_s": 8000.0},
        {"row": "trl_0.6b_fixed", "peer": "trl", "shape": "0.6b", "dtype": "bfloat16", "layers": 28,
         "device": "NVIDIA H100", "versions": {"trl": "1.16.0"}, "variants": {
             "trl_sdpo": {"algorithm": "sdpo", "step_s": 0.5, "response_tokens_per_s": 1000.0},
             "trl_grpo": {"algorithm": "grpo", "step_s": 0.25, "response_tokens_per_s": 2000.0,
                          "device_peak_bytes": 3 * 2**30},
             "trl_gkd": {"error": "ImportError: no GKDTrainer"}}},
    ]  # fmt: skip
    lines = gpu_rows.peer_lines(rows)
    sdpo = next(line for line in lines if line.startswith("| trl_sdpo "))
    grpo = next(line for line in lines if line.startswith("| trl_grpo "))
    assert "ours_cudnn_sdpo_0.6b_fixed" in sdpo and "**3.00×**" in sdpo
    assert "ours_cudnn_grpo_0.6b_fixed" in grpo and "**2.00×**" in grpo and "| 3.0 |" in grpo
    assert any(line.startswith("| trl_gkd | – | ImportError") for line in lines)
    # The TRL row is not also printed as a stray "torch"/"versions" line.
    assert not any("trl_0.6b_fixed" in line for line in gpu_rows.other_lines(rows))


def test_ab_rows_keep_their_tree_in_the_row_name(repo_module, tmp_path):
    """bench/gpu_ab.sh writes each row twice ("new", "old"): the summary tells them apart."""
    gpu_rows = repo_module("bench/gpu_rows.py")
    step = {"row": "ours_cudnn_sdpo_8bx4_large", "bench": "train_step", "algorithm": "sdpo",
            "shape": "8b", "layers": 4, "batch": 8, "prompt": 512, "response": 512,
            "param_dtype": "float32", "compute_dtype": "bfloat16", "step_s": 0.15,
            "response_tokens_per_s": 27000.0, "tokens_per_s": 110000.0, "mfu": 0.9,
            "mfu_model_flops": 0.5, "first_step_s": 20.0}  # fmt: skip
    lines = [json.dumps({"ab": "new"} | step),
             json.dumps({"ab": "old"} | step | {"step_s": 0.16}),
             json.dumps({"ab": "old", "skipped": "^head$", "left_s": 12})]  # fmt: skip
    path = tmp_path / "ab_rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = gpu_rows.load(path)
    assert [r["row"] for r in rows] == [
        "ours_cudnn_sdpo_8bx4_large [new]",
        "ours_cudnn_sdpo_8bx4_large [old]",
        "^head$ [old]",
    ]
    table = gpu_rows.step_table(rows)
    assert any(line.startswith("| ours_cudnn_sdpo_8bx4_large [new] |") and "0.1500" in line
               for line in table)  # fmt: skip
    assert any(line.startswith("| ours_cudnn_sdpo_8bx4_large [old] |") and "0.1600" in line
               for line in table)  # fmt: skip
    assert any(line.startswith("- ^head$ [old]: ^head$") for line in gpu_rows.other_lines(rows))
