"""Distillation head: peak memory and fwd+bwd time, chunked JAX vs naive JAX vs naive PyTorch.

The head maps response hidden states `[N, H]` through an untied LM head `[H, V]` (student and
EMA teacher) to the top-k (k=100) + tail JSD, token-mean, and back-propagates into the
student's hidden states and head weight. Variants, each in its own subprocess:
- `jax_chunked`: jaxsd.train.head.chunked_head (logits live one chunk at a time, recomputed in
  the backward pass), which also yields the per-token log-prob and entropy the step needs;
- `jax_naive`: full `[N, V]` logits, then jaxsd.losses.distillation_divergence;
- `torch_naive`: full `[N, V]` logits in PyTorch, then the SDPO code's recipe
  (bench/peers/sdpo_torch.py).
Each child reports its peak RSS (VmHWM) and its RSS once the inputs exist; the parent
also polls the child's RSS and kills it past --rss-limit-gb (the machine is shared), which
the JSON reports as an error rather than a number. Prints one JSON object.

Usage: .venv/bin/python bench/distill_head.py [--tokens 4096 --hidden 1024 --vocab 151936]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("jax_chunked", "jax_naive", "torch_naive")
HERE = Path(__file__).resolve().parent


def _status_kb(field: str, pid: str = "self") -> int:
    """A `/proc/<pid>/status` memory field (VmHWM, VmRSS) in KiB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # compile / allocate
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _inputs(args: argparse.Namespace):
    """Fixed random inputs as numpy: hidden states, head weights, tokens (same for all variants)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    # Scale so logits have O(1)-O(10) spread, like a trained model's.
    s_h = rng.standard_normal((n, h), dtype=np.float32)
    t_h = s_h + 0.1 * rng.standard_normal((n, h), dtype=np.float32)
    s_w = rng.standard_normal((h, v), dtype=np.float32) * (2.0 / h**0.5)
    t_w = s_w + 0.01 * rng.standard_normal((h, v), dtype=np.float32)
    tokens = rng.integers(0, v, n).astype(np.int32)
    return s_h, s_w, t_h, t_w, tokens


def _jax_fn(variant: str, args: argparse.Namespace):
    import jax
    import jax.numpy as jnp

    from jaxsd import losses

    impl = "jaxsd.losses.distillation_divergence on full logits"
    if variant == "jax_chunked":
        from jaxsd.train.head import chunked_head

        impl = "jaxsd.train.head.chunked_head"

        def loss(s_h, s_w, t_h, t_w, tokens):
            out = chunked_head(s_h[None], s_w, tokens[None], t_h[None], t_w,
                               chunk_size=args.chunk_size, top_k=args.top_k)  # fmt: skip
            return jnp.mean(out["divergence"])
    else:

        def loss(s_h, s_w, t_h, t_w, tokens):
            s_logits_NxV = s_h @ s_w
            t_logits_NxV = jax.lax.stop_gradient(t_h @ t_w)
            d_N = losses.distillation_divergence(s_logits_NxV, t_logits_NxV, top_k=args.top_k)
            return jnp.mean(d_N)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    arrays = [jnp.asarray(a) for a in _inputs(args)]
    return impl, lambda: jax.block_until_ready(grad(*arrays))


def _torch_fn(args: argparse.Namespace):
    import torch

    sys.path.insert(0, str(HERE / "peers"))
    from sdpo_torch import sdpo_topk_jsd

    s_h, s_w, t_h, t_w, _ = (torch.from_numpy(a) for a in _inputs(args))
    s_h.requires_grad_(True)
    s_w.requires_grad_(True)

    def step():
        s_h.grad = s_w.grad = None
        with torch.no_grad():
            t_logits_NxV = t_h @ t_w
        loss = sdpo_topk_jsd(s_h @ s_w, t_logits_NxV, args.top_k).mean()
        loss.backward()
        return float(loss)

    return f"torch {torch.__version__}, bench/peers/sdpo_torch.py on full logits", step


def worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one variant in this process; returns the child's JSON record."""
    if variant == "torch_naive":
        impl, fn = _torch_fn(args)
    else:
        impl, fn = _jax_fn(variant, args)
    inputs_rss_kb = _status_kb("VmRSS")
    med, times = _median_time(fn, args.repeats)
    peak_kb = _status_kb("VmHWM")
    return {
        "impl": impl,
        "fwd_bwd_s": med,
        "times_s": [round(t, 4) for t in times],
        "peak_rss_gb": peak_kb / 2**20,
        "rss_after_inputs_gb": inputs_rss_kb / 2**20,
        "head_peak_gb": (peak_kb - inputs_rss_kb) / 2**20,
    }


def run_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run `variant` in a fresh interpreter, killing it past --rss-limit-gb."""
    flags = {k: v for k, v in vars(args).items() if k not in ("worker", "variants")}
    cmd = [sys.executable, __file__, "--worker", variant]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    env = dict(
        os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    limit_kb, peak_kb = args.rss_limit_gb * 2**20, 0
    while proc.poll() is None:
        peak_kb = max(peak_kb, _status_kb("VmRSS", str(proc.pid)))
        if peak_kb > limit_kb:
            proc.kill()
            proc.wait()
            why = f"RSS passed --rss-limit-gb={args.rss_limit_gb} (guard for the shared machine)"
            return {"error": f"killed: {why}; raise the limit or lower --tokens"}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {err.strip().splitlines()[-1:]}"}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="response tokens N")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk (jax_chunked)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-limit-gb", type=float, default=12.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return
    names = [v for v in args.variants.split(",") if v]
    if set(names) - set(VARIANTS):
        ap.error(f"unknown --variants {sorted(set(names) - set(VARIANTS))}; use {VARIANTS}")
    results = {v: run_child(v, args) for v in names}
    record: dict[str, Any] = {
        "bench": "distill_head", "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
        "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "top_k": args.top_k,
        "chunk_size": args.chunk_size, "variants": results,
    }  # fmt: skip
    ours = results.get("jax_chunked", {})
    for peer in ("jax_naive", "torch_naive"):
        other = results.get(peer, {})
        if "fwd_bwd_s" in ours and "fwd_bwd_s" in other:
            record[f"ratio_vs_{peer}"] = {
                "peak_memory_less_x": other["peak_rss_gb"] / ours["peak_rss_gb"],
                "head_memory_less_x": other["head_peak_gb"] / max(ours["head_peak_gb"], 1e-9),
                "time_x": ours["fwd_bwd_s"] / other["fwd_bwd_s"],
            }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
