"""MFU's denominator: the --peak flag, else a known device peak, else a clear error."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
