"""Exact top-k over a vocabulary: one `lax.top_k` vs `jaxsd.losses.top_k_indices` (pruned).

    .venv/bin/python bench/topk.py --rows 256 --vocab 151936 --k 100 [--widths 16 32 64]

Prints one JSON object: milliseconds per call of `jit(lax.top_k)` and of `jit(top_k_indices)`
at the default block width (`topk_block_width(V, k)`) and at each of `--widths`, timed
alternately in one process, median of `--reps`. The logits are rounded to a few levels so ties
are common, and every variant's indices are checked equal to `lax.top_k`'s before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="rows (tokens of one head chunk)")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--widths", type=int, nargs="*", default=[], help="block widths to add")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    for name in ("rows", "vocab", "k", "reps"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.k > a.vocab:
        p.error(f"--k {a.k} exceeds --vocab {a.vocab}")
    if any(w < 1 for w in a.widths):
        p.error(f"--widths must be >= 1, got {a.widths}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsd.losses import top_k_indices, topk_block_width

    logits = jnp.round(4 * jax.random.normal(jax.random.key(0), (a.rows, a.vocab)))
    default = topk_block_width(a.vocab, a.k)
    variants = {"lax.top_k": jax.jit(lambda x: jax.lax.top_k(x, a.k)[1])}
    variants[f"default (w {default})"] = jax.jit(lambda x: top_k_indices(x, a.k))
    for w in a.widths:
        variants[f"w {w}"] = jax.jit(lambda x, w=w: top_k_indices(x, a.k, block=w))
    expected = np.asarray(variants["lax.top_k"](logits))
    for name, fn in variants.items():
        if not np.array_equal(np.asarray(fn(logits)), expected):
            raise SystemExit(f"{name}: indices differ from lax.top_k")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(logits))
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "bench": "topk",
                "rows": a.rows,
                "vocab": a.vocab,
                "k": a.k,
                "default_width": default,
                "ms": ms,
                "speedup_default": ms["lax.top_k"] / ms[f"default (w {default})"],
                "device": jax.devices()[0].device_kind,
            }
        )
    )


if __name__ == "__main__":
    main()
