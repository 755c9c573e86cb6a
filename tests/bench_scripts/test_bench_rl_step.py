"""bench/gpu_rl_step.sh: the gpu_0p6b preset (whole SC-SDPO step on one GPU) run end to end at
tiny size on CPU, and bench/rl_step_split.py's per-step time split."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_the_gpu_preset_is_the_issues_workload(repo_module):
    c = repo_module("configs/sc_sdpo.py").get_config("gpu_0p6b")
    assert (c.task.questions_per_step, c.rollout.n, c.rollout.max_new_tokens) == (32, 8, 1024)
    assert (c.rollout.engine, c.model.path, c.algorithm.name) == ("jax", "", "sc_sdpo")
    tiny = c.model.tiny  # Qwen3-0.6B's shape, made on the fly (no hub)
    keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    assert [tiny[k] for k in keys] == [151936, 1024, 28, 16, 8, 128]
    assert tiny.intermediate_size == 3072 and tiny.tie_word_embeddings
    assert c.profile_teacher_forward and c.model.compute_dtype == "bfloat16"
    assert (32 * 8) % c.optim.micro_batches == 0


def test_step_split_names_every_part_and_the_remainder(repo_module):
    split = repo_module("bench/rl_step_split.py")
    row = {
        "step": 2, "time/rollout_s": 3.0, "time/verify_s": 0.5, "time/teacher_forward_s": 1.0,
        "time/train_s": 4.0, "time/publish_s": 0.25, "time/eval_s": 2.0, "time/step_s": 9.0,
        "mem/device_peak_bytes": 40.5 * 2**30,
    }  # fmt: skip
    out = split.step_split(row)
    assert out["other"] == pytest.approx(9.0 - (3.0 + 0.5 + 1.0 + 4.0 + 0.25))
    assert out["peak_device_gib"] == 40.5 and out["eval"] == 2.0
    first = {**row, "step": 1, "time/rollout_s": 30.0, "time/step_s": 36.0}
    summary = split.summarize([first, row, {"step": 2, "eval/x": 1.0}])
    assert summary["mean_after_first"]["rollout"] == 3.0  # the compile step is left out
    assert summary["rollout_share_of_step"] == pytest.approx(3.0 / 9.0)


def test_gpu_rl_step_script_runs_the_preset_at_tiny_size(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), SMOKE="1", PY=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_rl_step.sh")],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    split = json.loads((tmp_path / "split.json").read_text())
    assert [s["step_index"] for s in split["steps"]] == [1, 2]
    for s in split["steps"]:
        for part in ("rollout", "verify", "teacher_forward", "train", "publish", "step"):
            assert s[part] > 0, (part, s)
        assert s["other"] >= 0
    assert split["steps"][-1]["eval"] > 0  # the preset evaluates at its last step
    mean = split["mean_after_first"]
    assert split["rollout_share_of_step"] == pytest.approx(mean["rollout"] / mean["step"])
