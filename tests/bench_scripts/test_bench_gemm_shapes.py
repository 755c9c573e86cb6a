"""bench/gemm_shapes.py: the shapes it times are matmuls the train step really runs."""

from __future__ import annotations

import json
import math
import re

import jax
import pytest


@pytest.fixture(scope="module")
def gemm_shapes(repo_module):
    return repo_module("bench/gemm_shapes.py")


@pytest.fixture(scope="module")
def step_dots(repo_module) -> set[tuple[int, int]]:
    """{(output elements, contraction length)} of every dot in the compiled tiny SDPO step."""
    bench = repo_module("bench/train_step.py")
    trace_summary = repo_module("bench/trace_summary.py")
    from jaxsd.models import Transformer
    from jaxsd.train.optimizer import make_optimizer
    from jaxsd.train.state import create_train_state
    from jaxsd.train.step import make_train_step

    cfg = bench.model_config("tiny", None, "float32", "float32")
    step_cfg = bench.step_config("sdpo", 256)
    tx = make_optimizer(1e-5, weight_decay=0.01, clip_norm=1.0)
    graphdef, state, _ = create_train_state(
        lambda r: Transformer(cfg, rngs=r), tx, teacher_mode=step_cfg.teacher_mode
    )
    batch = bench.make_batch(cfg, "sdpo", 8, 128, 128, 64)
    step = make_train_step(graphdef, tx, step_cfg, donate=False)
    hlo = step.lower(state, jax.device_put(batch)).compile().as_text()
    dots = set()
    for fusion in trace_summary.dot_flops_by_fusion(hlo).values():
        for text in fusion["dots"]:
            out, k = re.fullmatch(r"out\[([\d, ]*)\] K=(\d+)", text).groups()
            dots.add((math.prod(int(d) for d in out.split(",")), int(k)))
    return dots


def test_every_timed_shape_is_a_matmul_of_the_tiny_step(gemm_shapes, step_dots):
    shapes = gemm_shapes.step_matmuls("tiny")
    assert len(shapes) == 8
    for name, (lhs, rhs) in shapes.items():
        assert lhs[-1] == rhs[-2], name
        out_elements = math.prod(lhs[:-1]) * rhs[-1]
        assert (out_elements, lhs[-1]) in step_dots, (name, lhs, rhs)


def test_prints_rates_of_both_engines(run_repo_script):
    proc = run_repo_script(
        "bench/gemm_shapes.py", "--shape", "tiny", "--reps", "2", "--rounds", "1"
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["bench"] == "gemm_shapes" and out["shape"] == "tiny"
    head = out["matmuls"]["head_chunk"]
    assert head["lhs"] == [256, 128] and head["rhs"] == [128, 512]
    assert head["gflop"] == pytest.approx(2 * 256 * 128 * 512 / 1e9)
    for row in out["matmuls"].values():
        assert row["jax_gflops"] > 0 and row["torch_gflops"] > 0
        assert row["jax_over_torch"] == pytest.approx(
            row["jax_gflops"] / row["torch_gflops"], rel=0.05
        )


def test_bad_counts_are_refused(run_repo_script):
    proc = run_repo_script("bench/gemm_shapes.py", "--reps", "0")
    assert proc.returncode == 2 and "--reps must be >= 1" in proc.stderr
