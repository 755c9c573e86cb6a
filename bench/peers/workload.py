"""The fixed step-benchmark workload (issue 9), shared by our bench and every peer runner.

Plain Python only: it is imported by scripts running in the throwaway peer virtualenvs, which
have torch or a different jax but not jaxsd.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

BATCH = 8  # sequences
PROMPT = 128  # student prompt tokens
RESPONSE = 128  # response tokens (the distilled / optimised positions)
TEACHER_EXTRA = 64  # the teacher's reprompt is this much longer than the student's prompt
TOP_K = 100
ALPHA = 0.5  # JSD
IS_CLIP = 2.0
LR = 1e-5
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
EMA_RATE = 0.05
SEED = 0

# Qwen3 architecture, untied head; field names follow transformers' Qwen3Config.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=512),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, intermediate_size=1536, vocab_size=32768),
}  # fmt: skip


def shape(name: str) -> dict[str, int]:
    """The model shape called `name` ("tiny" | "small")."""
    if name not in SHAPES:
        raise ValueError(f"--shape {name!r} is unknown; use one of {sorted(SHAPES)}")
    return dict(SHAPES[name])


def response_tokens_per_step() -> int:
    return BATCH * RESPONSE


def time_steps(
    step: Callable[[], Any], steps: int, warmup: int = 1
) -> tuple[list[float], list[float]]:
    """(wall, process-CPU) seconds of `steps` calls of `step()` (each blocks until done).

    CPU seconds are summed over the process's threads; on a shared, oversubscribed machine
    they move less than wall time, so they are reported next to it.
    """
    if steps < 1:
        raise ValueError(f"--steps={steps} must be >= 1")
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def step_record(times: tuple[list[float], list[float]], **extra: Any) -> dict[str, Any]:
    """The common JSON fields of a step benchmark: median step time and response tokens/s."""
    wall, cpu = times
    med = statistics.median(wall)
    return {
        "step_s": med,
        "response_tokens_per_s": response_tokens_per_step() / med,
        "min_step_s": min(wall),
        "cpu_s_per_step": statistics.median(cpu),
        "step_times_s": [round(t, 5) for t in wall],
        **extra,
    }


def emit(record: dict[str, Any]) -> None:
    """Print the one JSON object a bench script outputs."""
    print(json.dumps(record), flush=True)
