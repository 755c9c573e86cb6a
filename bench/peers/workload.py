"""The fixed step-benchmark workload (issue 9), shared by our bench and every peer runner.

Plain Python only: it is imported by scripts running in the throwaway peer virtualenvs, which
have torch or a different jax but not jaxsd.
"""

from __future__ import annotations

import importlib.metadata
import json
import statistics
import time
import traceback
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

# MFU's denominator when no --peak-gflops/--peak-tflops is given. CPU: the fp32 4096² matmul of
# this project's idle 2-core machine (FACTS.md), the convention. Accelerators: the
# vendor's dense (no sparsity) 16-bit matmul peak, by device-kind substring, first match wins.
CPU_NOMINAL_PEAK_GFLOPS = 138.0
DENSE_16BIT_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),  # also GH200
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5", 459.0),  # v5p
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
)


def resolve_peak_gflops(
    flag_gflops: float | None, platform: str, device_kind: str, compute_dtype: str
) -> tuple[float, str]:
    """(peak GFLOP/s for MFU, where it came from): the flag, else CPU nominal, else the table.

    Raises ValueError for an accelerator the table does not know, or fp32 compute on one (its
    peak depends on TF32/precision settings): a wrong denominator would print a plausible MFU.
    """
    if flag_gflops is not None:
        if flag_gflops <= 0:
            raise ValueError(f"peak {flag_gflops} GFLOP/s must be > 0")
        return flag_gflops, "flag"
    if platform == "cpu":
        return CPU_NOMINAL_PEAK_GFLOPS, "cpu nominal (this project's 2-core machine, FACTS.md)"
    if compute_dtype in ("bfloat16", "float16"):
        for key, tflops in DENSE_16BIT_PEAK_TFLOPS:
            if key.lower() in device_kind.lower():
                return tflops * 1e3, f"table: {key}, dense 16-bit"
    raise ValueError(
        f"no known {compute_dtype} peak for device {device_kind!r} ({platform}); pass "
        "--peak-tflops with the device's dense peak for that dtype"
    )


# Qwen3 architecture, untied head; field names follow transformers' Qwen3Config.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=512),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, intermediate_size=1536, vocab_size=32768),
    # Qwen3-0.6B's shape, but with an untied head like the other shapes (0.75 B params).
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936),
    # Qwen3-8B's layer shape (36 layers); GPU rows cut the depth with --layers to fit AdamW.
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936),
}  # fmt: skip


def random_qwen3_folder(path: Any, fields: dict[str, int], seed: int = 0) -> Any:
    """Save a random-init fp32 Qwen3 (untied head, `fields` as in SHAPES) as an HF folder with
    no tokenizer (the engines take token ids); returns the torch model."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **fields, max_position_embeddings=4096, tie_word_embeddings=False,
        architectures=["Qwen3ForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    return model


def shape(name: str) -> dict[str, int]:
    """The model shape called `name` ("tiny" | "small")."""
    if name not in SHAPES:
        raise ValueError(f"--shape {name!r} is unknown; use one of {sorted(SHAPES)}")
    return dict(SHAPES[name])


def response_tokens_per_step() -> int:
    return BATCH * RESPONSE


def param_counts(s: dict[str, int]) -> dict[str, int]:
    """Parameters of a Qwen3 shape (untied head): per group and in total."""
    h, d, f = s["hidden_size"], s["head_dim"], s["intermediate_size"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * f + 2 * d + 2 * h  # + q/k norms, 2 layer norms
    layers = s["num_hidden_layers"] * per_layer
    embed = head = s["vocab_size"] * h
    return {"layers": layers, "embed": embed, "head": head, "total": layers + embed + head + h}


def step_flops(
    s: dict[str, int], *, batch: int, prompt: int, response: int, teacher_extra: int,
    algo: str,
) -> dict[str, float]:  # fmt: skip
    """FLOPs of one train step, two ways (both: fwd = 2, fwd + bwd = 6 FLOPs per weight-token).

    - `six_n`: the issue's convention, 6 N per student token with N = all parameters, plus
      2 N per teacher token for SDPO (its extra no-grad forward). Over-counts our step: the
      embedding is a gather, not a matmul, and the LM head runs on response positions only.
    - `model`: the matmuls the step needs: the decoder layers on every token, the LM head on
      the response tokens only, and attention scores/values (4 T S d per head and layer
      forward, the full T x S matrix as computed) — the PaLM-style count, no recompute.
    """
    n = param_counts(s)
    ts, tt = prompt + response, prompt + teacher_extra + response
    student, teacher = batch * ts, batch * tt
    L, heads, d = s["num_hidden_layers"], s["num_attention_heads"], s["head_dim"]

    def attn(t: int) -> float:
        return 4.0 * batch * t * t * heads * d * L  # QK^T and PV, forward

    fwd_student = 2.0 * n["layers"] * student + 2.0 * n["head"] * batch * response + attn(ts)
    fwd_teacher = 2.0 * n["layers"] * teacher + 2.0 * n["head"] * batch * response + attn(tt)
    six_n = 6.0 * n["total"] * student
    model = 3.0 * fwd_student
    if algo == "sdpo":
        six_n += 2.0 * n["total"] * teacher
        model += fwd_teacher
    elif algo != "grpo":
        raise ValueError(f"algo={algo!r}; use 'sdpo' or 'grpo'")
    return {"six_n": six_n, "six_n_student_only": 6.0 * n["total"] * student, "model": model}


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


def error_record(e: BaseException) -> dict[str, Any]:
    """A peer variant that failed (an API that moved): a result to report, not a crash."""
    tail = traceback.format_exc().strip().splitlines()[-4:]
    return {"error": f"{type(e).__name__}: {e}", "traceback_tail": tail}


def versions(*packages: str) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {pkg: version(pkg) for pkg in packages}


def emit(record: dict[str, Any]) -> None:
    """Print the one JSON object a bench script outputs."""
    print(json.dumps(record), flush=True)
