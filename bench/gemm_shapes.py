"""The train step's GEMMs one at a time: JAX (XLA) vs PyTorch at the workload's matmul shapes.

    .venv/bin/python bench/gemm_shapes.py --shape tiny

Are narrow GEMMs (contracting over 32-256 elements) slower in XLA:CPU than in PyTorch? Each
matmul shape of the issue-9 step (layer projections forward and weight gradient, head chunk,
attention scores and values) is timed alone, fp32, JAX and torch alternating per shape,
median of `--reps` calls after a warm-up. Prints one JSON object: GFLOP/s per shape and
engine and their ratio. torch uses as many threads as XLA's CPU client (all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import workload as W  # noqa: E402

HEAD_CHUNK = 256  # jaxsd's default head chunk (tokens per head matmul)


def step_matmuls(shape: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{name: (lhs shape, rhs shape)} of the SDPO step's matmuls at the fixed workload."""
    s = W.shape(shape)
    h, f, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    n, k, d = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    b, t = W.BATCH, W.PROMPT + W.RESPONSE
    teacher_t = t + W.TEACHER_EXTRA
    tokens = b * t
    g = n // k  # query heads per kv head: queries of a kv head form one [G*T, D] block
    return {
        "q_proj": ((tokens, h), (h, n * d)),
        "kv_proj": ((tokens, h), (h, k * d)),
        "mlp_up": ((tokens, h), (h, f)),
        "mlp_down": ((tokens, f), (f, h)),
        "mlp_up_weight_grad": ((h, tokens), (tokens, f)),
        "head_chunk": ((HEAD_CHUNK, h), (h, v)),
        "attn_scores_teacher": ((b * k, g * teacher_t, d), (b * k, d, teacher_t)),
        "attn_values_teacher": ((b * k, g * teacher_t, teacher_t), (b * k, teacher_t, d)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(W.SHAPES), default="tiny")
    p.add_argument("--reps", type=int, default=100, help="timed calls per shape and engine")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two engines")
    a = p.parse_args()
    for name in ("reps", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    matmul = jax.jit(jnp.matmul)
    rng = np.random.default_rng(W.SEED)
    rows = {}
    for name, (lhs, rhs) in step_matmuls(a.shape).items():
        x = rng.standard_normal(lhs, dtype=np.float32)
        y = rng.standard_normal(rhs, dtype=np.float32)
        gflop = 2 * float(np.prod(lhs)) * rhs[-1] / 1e9
        jx, jy = jax.device_put(x), jax.device_put(y)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        engines = {
            "jax": lambda jx=jx, jy=jy: matmul(jx, jy).block_until_ready(),
            "torch": lambda tx=tx, ty=ty: torch.matmul(tx, ty),
        }
        seconds: dict[str, list[float]] = {"jax": [], "torch": []}
        for r in range(a.rounds):
            for engine in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
                wall, _ = W.time_steps(engines[engine], a.reps, warmup=3)
                seconds[engine].append(statistics.median(wall))
        rate = {e: gflop / statistics.median(s) for e, s in seconds.items()}
        rows[name] = {
            "lhs": list(lhs),
            "rhs": list(rhs),
            "gflop": gflop,
            "jax_gflops": round(rate["jax"], 1),
            "torch_gflops": round(rate["torch"], 1),
            "jax_over_torch": round(rate["jax"] / rate["torch"], 3),
        }
    print(
        json.dumps(
            {
                "bench": "gemm_shapes",
                "shape": a.shape,
                "reps": a.reps,
                "rounds": a.rounds,
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "jax": jax.__version__,
                "torch": torch.__version__,
                "device": str(jax.devices()[0].device_kind),
                "load_avg_1m": os.getloadavg()[0],
                "matmuls": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
