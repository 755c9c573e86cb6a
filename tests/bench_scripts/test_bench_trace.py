"""bench/trace_summary.py --hlo: FLOPs of each dot fusion from an HLO dump, GFLOP/s from a trace."""
# ruff: noqa: E501  (HLO lines are quoted verbatim)

from __future__ import annotations

import gzip
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The shape of XLA:CPU's *after_optimizations.txt: fused computations, then the entry
# computation calling them (a head weight gradient [512, 256] x [256, 32768], a batched dot and
# an elementwise fusion without any dot).
HLO = """\
HloModule jit_train_step, entry_computation_layout={()->f32[512,32768]{1,0}}

%fused_computation.1 (param_0.1: f32[512,256], param_1.1: f32[256,32768]) -> f32[512,32768] {
  %param_0.1 = f32[512,256]{1,0} parameter(0)
  %param_1.1 = f32[256,32768]{1,0} parameter(1)
  ROOT %dot_general.5 = f32[512,32768]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="dot_general"}
}

%fused_computation.2 (param_0.2: f32[4,8,16], param_1.2: f32[4,16,32]) -> f32[4,8,32] {
  %param_0.2 = f32[4,8,16]{2,1,0} parameter(0)
  %param_1.2 = f32[4,16,32]{2,1,0} parameter(1)
  %dot.7 = f32[4,8,32]{2,1,0} dot(%param_0.2, %param_1.2), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  ROOT %neg.1 = f32[4,8,32]{2,1,0} negate(%dot.7)
}

%fused_computation.3 (param_0.3: f32[64]) -> f32[64] {
  %param_0.3 = f32[64]{0} parameter(0)
  ROOT %exp.1 = f32[64]{0} exponential(%param_0.3)
}

ENTRY %main.9 () -> f32[512,32768] {
  %a = f32[512,256]{1,0} constant({...})
  %b = f32[256,32768]{1,0} constant({...})
  %ynn_fusion.1 = f32[512,32768]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, backend_config={}
  %c = f32[4,8,16]{2,1,0} constant({...})
  %d = f32[4,16,32]{2,1,0} constant({...})
  %ynn_fusion.2 = f32[4,8,32]{2,1,0} fusion(%c, %d), kind=kCustom, calls=%fused_computation.2
  %e = f32[64]{0} constant({...})
  %loop_fusion = f32[64]{0} fusion(%e), kind=kLoop, calls=%fused_computation.3
  ROOT %r = f32[512,32768]{1,0} copy(%ynn_fusion.1)
}
"""


@pytest.fixture(scope="module")
def trace_summary(repo_module):
    return repo_module("bench/trace_summary.py")


def test_dot_flops_are_two_times_output_times_contraction(trace_summary):
    flops = trace_summary.dot_flops_by_fusion(HLO)
    assert set(flops) == {"ynn_fusion.1", "ynn_fusion.2"}  # the exp fusion has no dot
    assert flops["ynn_fusion.1"]["gflop"] == pytest.approx(2 * 512 * 32768 * 256 / 1e9)
    assert flops["ynn_fusion.2"]["gflop"] == pytest.approx(2 * (4 * 8 * 32) * 16 / 1e9)
    assert flops["ynn_fusion.1"]["dots"] == ["out[512, 32768] K=256"]


def test_dot_rates_from_a_trace(trace_summary, tmp_path):
    # Two calls of the 8.59 GFLOP weight gradient, 100 ms and 300 ms: 42.9 GFLOP/s on average.
    events = [
        {"ph": "X", "name": "ynn_fusion.1", "dur": 100_000, "pid": 1},
        {"ph": "X", "name": "ynn_fusion.1", "dur": 300_000, "pid": 1},
        {"ph": "X", "name": "loop_fusion", "dur": 50_000, "pid": 1},
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
    ]
    trace_dir = tmp_path / "plugins/profile/run"
    trace_dir.mkdir(parents=True)
    (trace_dir / "host.perfetto_trace.json.gz").write_bytes(
        gzip.compress(json.dumps({"traceEvents": events}).encode())
    )
    hlo = tmp_path / "module.cpu_after_optimizations.txt"
    hlo.write_text(HLO)
    out = trace_summary.summarise(tmp_path, top=10, hlo=hlo)
    (row,) = out["dot_fusions"]  # ynn_fusion.2 never ran in this trace
    assert row["op"] == "ynn_fusion.1" and row["n"] == 2 and row["ms"] == pytest.approx(400)
    assert row["gflops"] == pytest.approx(2 * 2 * 512 * 32768 * 256 / 1e9 / 0.4, rel=1e-2)
    assert out["top_device_ops"][0]["op"] == "ynn_fusion.1"
