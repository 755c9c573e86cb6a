"""Train-step benchmark (issue 9's fixed workload) and the chunked-head memory benchmark.

    python bench/train_step.py --shape tiny   # SDPO step: {"step_s", "response_tokens_per_s"}
    python bench/train_step.py --head         # chunked vs full-logit head at V=151,936

Step workload: B = 8, prompt 128 + response 128 (student), teacher context 64 tokens longer,
top-k 100 JSD with tail over the response, token-mean, AdamW + clip 1.0, EMA teacher, random
data and weights. `--head` compiles the distillation head's value-and-gradient for 4,096
response tokens in a fresh subprocess per variant and reads XLA's buffer assignment
(`compiled.memory_analysis()`: the peak of live temporaries, no execution needed); it then
times both variants at `--time-tokens` tokens, small enough for the full-logit one to fit.
Every run prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    "tiny": dict(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        vocab_size=512,
    ),
    "small": dict(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=32768,
    ),
}
B, PROMPT, RESPONSE, TEACHER_EXTRA, TOP_K = 8, 128, 128, 64, 100
NOMINAL_PEAK_GFLOPS = 138.0  # fp32 4096^2 matmul on the project's idle 2-core CPU (FACTS.md)


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    """Median fp32 GFLOP/s of an n x n matmul: the peak this process gets right now."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def bench_step(shape: str, steps: int, warmup: int, chunk_size: int, peak: float) -> dict:
    import jax
    import numpy as np

    from jaxsd.models import ModelConfig, Transformer
    from jaxsd.train.batch import TrainSample, build_batch
    from jaxsd.train.optimizer import make_optimizer
    from jaxsd.train.state import create_train_state
    from jaxsd.train.step import StepConfig, make_train_step

    cfg = ModelConfig(**SHAPES[shape])
    tx = make_optimizer(1e-5, clip_norm=1.0)
    graphdef, state, _ = create_train_state(
        lambda r: Transformer(cfg, rngs=r), tx, teacher_mode="ema"
    )
    rng = np.random.default_rng(0)
    v = cfg.vocab_size
    samples = [
        TrainSample(
            prompt_ids=rng.integers(0, v, PROMPT).tolist(),
            response_ids=rng.integers(0, v, RESPONSE).tolist(),
            old_logp=np.full(RESPONSE, -np.log(v), np.float32),
            teacher_prompt_ids=rng.integers(0, v, PROMPT + TEACHER_EXTRA).tolist(),
            sd_weight=1.0,
        )
        for _ in range(B)
    ]
    batch = jax.device_put(
        build_batch(
            samples,
            pad_id=0,
            length_buckets=(RESPONSE, PROMPT + RESPONSE, PROMPT + TEACHER_EXTRA + RESPONSE),
        )
    )
    step = make_train_step(
        graphdef,
        tx,
        StepConfig(
            top_k=TOP_K,
            alpha=0.5,
            add_tail=True,
            loss_agg_mode="token-mean",
            chunk_size=chunk_size,
            ema_rate=0.05,
        ),
    )
    load_before = os.getloadavg()[0]
    measured_peak = matmul_gflops()
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    measured_peak = max(measured_peak, matmul_gflops())  # the better of before/after
    step_s = statistics.median(times)
    n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    # Model FLOPs: 6 N per student token (fwd + bwd) + 2 N per teacher token (fwd only).
    student_tokens, teacher_tokens = (
        B * (PROMPT + RESPONSE),
        B * (PROMPT + TEACHER_EXTRA + RESPONSE),
    )
    flops = 6 * n_params * student_tokens + 2 * n_params * teacher_tokens
    gflops = flops / step_s / 1e9
    return {
        "bench": "train_step",
        "shape": shape,
        "step_s": step_s,
        "min_step_s": min(times),
        "response_tokens_per_s": B * RESPONSE / step_s,
        "first_step_s": compile_s,
        "params": n_params,
        "steps": steps,
        "chunk_tokens": chunk_size,
        "model_gflop_per_step": flops / 1e9,
        "achieved_gflops": gflops,
        "peak_gflops": peak,
        "mfu": gflops / peak,
        # The convention for the PyTorch 54 %: 6 N x student tokens only.
        "mfu_student_only": 6 * n_params * student_tokens / step_s / 1e9 / peak,
        "measured_matmul_gflops": measured_peak,
        "mfu_vs_measured_matmul": gflops / measured_peak,
        "loss": float(m["loss"][0]),
        "device": str(jax.devices()[0].device_kind),
        "load_avg_1m_before": load_before,
        "load_avg_1m": os.getloadavg()[0],
    }


def head_variant(
    variant: str, tokens: int, vocab: int, hidden: int, chunk: int, time_it: bool
) -> dict:
    """Value-and-grad of the token-mean top-k JSD head on random hidden states."""
    import jax
    import jax.numpy as jnp

    from jaxsd.train.head import chunked_head, head_on_logits

    b = 8
    r = tokens // b
    ks = jax.random.split(jax.random.key(0), 5)
    s_h = jax.random.normal(ks[0], (b, r, hidden), jnp.float32)
    t_h = jax.random.normal(ks[1], (b, r, hidden), jnp.float32)
    s_w = 0.05 * jax.random.normal(ks[2], (hidden, vocab), jnp.float32)
    t_w = 0.05 * jax.random.normal(ks[3], (hidden, vocab), jnp.float32)
    tok = jax.random.randint(ks[4], (b, r), 0, vocab)

    def loss(s_h, s_w):
        if variant == "chunked":
            out = chunked_head(s_h, s_w, tok, t_h, t_w, chunk_size=chunk, top_k=TOP_K)
        else:  # the naive version: materialise [B, R, V] logits for student and teacher
            out = head_on_logits(s_h @ s_w, tok, t_h @ t_w, top_k=TOP_K)
        return jnp.mean(out["divergence"]) + 0.0 * jnp.mean(out["logp"])

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = fn.lower(s_h, s_w).compile()
    mem = compiled.memory_analysis()
    result = {
        "variant": variant,
        "tokens": tokens,
        "vocab": vocab,
        "hidden": hidden,
        "compile_s": time.perf_counter() - t0,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": int(
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        ),
    }
    if time_it:
        jax.block_until_ready(compiled(s_h, s_w))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(s_h, s_w))
            times.append(time.perf_counter() - t0)
        result["time_s"] = statistics.median(times)
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"head variant {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_head(tokens: int, vocab: int, hidden: int, chunk: int, time_tokens: int) -> dict:
    common = ["--vocab", str(vocab), "--hidden", str(hidden), "--chunk", str(chunk)]
    mem = {
        v: _subprocess(["--head-variant", v, "--tokens", str(tokens), *common])
        for v in ("chunked", "full")
    }
    timed = {
        v: _subprocess(["--head-variant", v, "--tokens", str(time_tokens), "--time", *common])
        for v in ("chunked", "full")
    }
    return {
        "bench": "distillation_head",
        "tokens": tokens,
        "vocab": vocab,
        "hidden": hidden,
        "chunk_tokens": chunk,
        "memory": mem,
        "peak_ratio_full_over_chunked": mem["full"]["peak_bytes"] / mem["chunked"]["peak_bytes"],
        "time_tokens": time_tokens,
        "timing": timed,
        "time_ratio_chunked_over_full": timed["chunked"]["time_s"] / timed["full"]["time_s"],
        "load_avg_1m": os.getloadavg()[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256, help="tokens per LM-head chunk")
    p.add_argument("--head", action="store_true", help="chunked vs full-logit head benchmark")
    p.add_argument("--head-variant", choices=("chunked", "full"), help=argparse.SUPPRESS)
    p.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=NOMINAL_PEAK_GFLOPS,
        help="device peak for MFU (default: the idle 2-core CPU's fp32 matmul)",
    )
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--time-tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=128)
    a = p.parse_args()
    if a.head_variant:
        result = head_variant(a.head_variant, a.tokens, a.vocab, a.hidden, a.chunk, a.time)
    elif a.head:
        result = bench_head(a.tokens, a.vocab, a.hidden, a.chunk, a.time_tokens)
    else:
        result = bench_step(a.shape, a.steps, a.warmup, a.chunk, a.peak_gflops)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
