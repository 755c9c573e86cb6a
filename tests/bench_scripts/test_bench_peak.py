"""MFU's denominator: the --peak flag, else a known device peak, else a clear error."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workload(repo_module):
    return repo_module("bench/peers/workload.py")


@pytest.mark.parametrize(
    "platform,kind,dtype,gflops",
    [
        ("cpu", "cpu", "float32", 138.0),
        ("gpu", "NVIDIA H100 80GB HBM3", "bfloat16", 989_400.0),
        ("gpu", "NVIDIA H100 PCIe", "bfloat16", 756_000.0),  # not the SXM figure
        ("gpu", "NVIDIA H200", "bfloat16", 989_400.0),
        ("gpu", "NVIDIA A100-SXM4-80GB", "float16", 312_000.0),
        ("tpu", "TPU v5 lite", "bfloat16", 197_000.0),  # v5e, not v5p's 459
        ("tpu", "TPU v5", "bfloat16", 459_000.0),
        ("tpu", "TPU v4", "bfloat16", 275_000.0),
    ],
)
def test_known_devices_resolve_to_their_dense_peak(workload, platform, kind, dtype, gflops):
    peak, source = workload.resolve_peak_gflops(None, platform, kind, dtype)
    assert peak == pytest.approx(gflops)
    assert source.startswith("cpu nominal" if platform == "cpu" else "table")


def test_the_flag_wins_and_must_be_positive(workload):
    assert workload.resolve_peak_gflops(500.0, "gpu", "NVIDIA H100", "bfloat16") == (500.0, "flag")
    with pytest.raises(ValueError, match="must be > 0"):
        workload.resolve_peak_gflops(0.0, "cpu", "cpu", "float32")


@pytest.mark.parametrize(
    "kind,dtype", [("NVIDIA L40S", "bfloat16"), ("NVIDIA H100 80GB HBM3", "float32")]
)
def test_unknown_peak_is_an_error_naming_the_flag(workload, kind, dtype):
    with pytest.raises(ValueError, match="--peak-tflops") as e:
        workload.resolve_peak_gflops(None, "gpu", kind, dtype)
    assert kind in str(e.value) and dtype in str(e.value)


def test_train_step_cli_rejects_a_nonpositive_peak():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/train_step.py"), "--peak-gflops", "-1", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "must be > 0" in proc.stderr


def _train_step_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench/train_step.py"), "--steps", "1", "--warmup", "0"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)


def test_train_step_lora_flags_train_only_the_adapters(workload):
    proc = _train_step_cli("--matmul-n", "256", "--lora-rank", "4", "--lora-targets", "q,v")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    s = workload.shape("tiny")
    h, d = s["hidden_size"], s["head_dim"]
    q_out, v_out = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    # rank x (in + out) per adapted projection (A [in, r], B [r, out]), every layer.
    adapters = s["num_hidden_layers"] * 4 * ((h + q_out) + (h + v_out))
    assert out["trainable_params"] == adapters
    assert out["params"] == workload.param_counts(s)["total"]  # the frozen base, all of it
    assert (out["lora_rank"], out["lora_targets"]) == (4, ["q", "v"])
    assert math.isfinite(out["loss"]) and out["step_s"] > 0


@pytest.mark.parametrize(
    "args, message",
    [(("--lora-rank", "-1"), "--lora-rank"), (("--lora-targets", "q,gate_proj"), "--lora-targets")],
)
def test_train_step_cli_rejects_bad_lora_flags(args, message):
    proc = _train_step_cli(*args)
    assert proc.returncode == 2 and message in proc.stderr
