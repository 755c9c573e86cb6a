"""The LM head's weight gradient dW = hᵀ g alone: XLA's folded transpose vs jaxsd's form.

    .venv/bin/python bench/head_weight_grad.py --hidden 512 --vocab 32768 --tokens 256

Prints one JSON object: GFLOP/s of `einsum("nh,nv->hv")` (the transpose of h folded into the
GEMM, what autodiff emits) and of `jaxsd.train.head._weight_grad` (on CPU: h transposed into
its own buffer first), timed alternately in one process, median of `--reps`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=256, help="tokens per head chunk (contraction)")
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    for name in ("hidden", "vocab", "tokens", "reps"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")

    import jax
    import jax.numpy as jnp

    from jaxsd.train.head import _weight_grad

    kh, kg = jax.random.split(jax.random.key(0))
    h = jax.random.normal(kh, (a.tokens, a.hidden))
    g = jax.random.normal(kg, (a.tokens, a.vocab))
    variants = {
        "folded": jax.jit(lambda h, g: jnp.einsum("nh,nv->hv", h, g)),
        "jaxsd": jax.jit(_weight_grad),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        jax.block_until_ready(fn(h, g))
    for _ in range(a.reps):
        for name, fn in variants.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(h, g))
            times[name].append(time.perf_counter() - t)
    gflop = 2 * a.tokens * a.hidden * a.vocab / 1e9
    gflops = {name: gflop / statistics.median(ts) for name, ts in times.items()}
    print(json.dumps({
        "bench": "head_weight_grad", "hidden": a.hidden, "vocab": a.vocab, "tokens": a.tokens,
        "reps": a.reps, "gflops": gflops, "speedup": gflops["jaxsd"] / gflops["folded"],
        "device": str(jax.devices()[0].device_kind), "load_avg_1m": os.getloadavg()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
