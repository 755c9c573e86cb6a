"""Train-step benchmark (issue 9's fixed workload) and the chunked-head memory benchmark.

    python bench/train_step.py --shape tiny                # SDPO step: {"step_s", ...}
    python bench/train_step.py --shape tiny --algo grpo    # GRPO learner step
    python bench/train_step.py --shape 0.6b --dtype bfloat16 --batch 32 --prompt 256 ...
    python bench/train_step.py --matmul-only --dtype bfloat16 --matmul-n 8192
    python bench/train_step.py --head                      # chunked vs full-logit head

Step workload (defaults = the issue's): B = 8, prompt 128 + response 128 (student), teacher
context 64 tokens longer, AdamW + clip 1.0, random data and weights. `--algo sdpo`: top-k
100 JSD with tail over the response, token-mean, IS clip 2, EMA teacher (two forwards).
`--algo grpo`: our step with GRPO's switches (jaxsd.algorithms.grpo: surrogate only, no
teacher, no EMA), the clipped surrogate with eps 0.2 / 0.28 (TRL's `dapo` settings, beta 0),
token-mean, advantages spread over [-1, 1] like the peers' (one forward).
`--head` compiles the distillation head's value-and-gradient in a fresh subprocess per variant
and reads XLA's buffer assignment (`compiled.memory_analysis()`); on a GPU it also reports the
device's peak bytes in use (JAX `memory_stats`, torch `max_memory_allocated`), and
`--head-torch` adds the naive PyTorch head. Every run prints one JSON object.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import workload as W  # noqa: E402

SHAPES = sorted(W.SHAPES)
TOP_K = W.TOP_K


def model_config(
    shape: str,
    layers: int | None,
    param_dtype: str,
    dtype: str,
    attention: str = "jaxsd",
    remat: bool = False,
) -> Any:
    """Our ModelConfig for a workload shape (HF field names -> ours), depth optionally cut."""
    from jaxsd.models import ModelConfig

    s = W.shape(shape)
    return ModelConfig(
        hidden_size=s["hidden_size"],
        num_layers=layers or s["num_hidden_layers"],
        num_heads=s["num_attention_heads"],
        num_kv_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        intermediate_size=s["intermediate_size"],
        vocab_size=s["vocab_size"],
        param_dtype=param_dtype,
        compute_dtype=dtype,
        attention=attention,
        remat=remat,
    )


def matmul_gflops(n: int = 4096, dtype: str = "float32", repeats: int = 5) -> float:
    """Median GFLOP/s of an n x n matmul in `dtype`: the peak this process gets right now."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def device_peak_bytes(key: str = "peak_bytes_in_use") -> int | None:
    """Peak (or, with key "bytes_in_use", current) bytes on the first device (GPU/TPU); None
    where JAX keeps no stats (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get(key, 0)) or None


def make_batch(cfg: Any, algo: str, b: int, prompt: int, response: int, extra: int) -> Any:
    """Random token ids; SDPO rows carry a reprompt `extra` tokens longer, GRPO rows advantages."""
    import numpy as np

    from jaxsd.algorithms import LossWeights
    from jaxsd.train.batch import TrainSample, build_batch

    rng = np.random.default_rng(W.SEED)
    v = cfg.vocab_size
    advantages = np.linspace(-1.0, 1.0, b)  # what the peers use (cost does not depend on it)
    samples = [
        TrainSample(
            prompt_ids=rng.integers(0, v, prompt).tolist(),
            response_ids=rng.integers(0, v, response).tolist(),
            old_logp=np.full(response, -np.log(v), np.float32),
            teacher_prompt_ids=rng.integers(0, v, prompt + extra).tolist()
            if algo == "sdpo"
            else None,
            weights=LossWeights(
                sd_weight=1.0 if algo == "sdpo" else 0.0,
                advantage=float(advantages[i]) if algo == "grpo" else 0.0,
                pg_weight=1.0 if algo == "grpo" else 0.0,
            ),
        )
        for i in range(b)
    ]
    teacher_len = prompt + (extra if algo == "sdpo" else 0) + response
    return build_batch(
        samples, pad_id=0, length_buckets=sorted({response, prompt + response, teacher_len})
    )


def step_config(algo: str, chunk_size: int, topk_block: int | None = None) -> Any:
    """StepConfig of the benchmarked algorithm, built the way jaxsd.train.loop builds it."""
    from jaxsd.algorithms.grpo import SURROGATE_SWITCHES
    from jaxsd.train.step import StepConfig

    if algo == "sdpo":
        return StepConfig(
            top_k=TOP_K,
            alpha=W.ALPHA,
            add_tail=True,
            is_clip=W.IS_CLIP,
            loss_agg_mode="token-mean",
            chunk_size=chunk_size,
            ema_rate=W.EMA_RATE,
            topk_block=topk_block,
        )
    if algo == "grpo":
        return StepConfig(
            loss_agg_mode="token-mean",
            chunk_size=chunk_size,
            clip_low=0.2,
            clip_high=0.28,
            **SURROGATE_SWITCHES,
        )
    raise ValueError(f"--algo {algo!r}; use 'sdpo' or 'grpo'")


def bench_step(a: argparse.Namespace) -> dict[str, Any]:
    import jax

    from jaxsd.losses import topk_block_width
    from jaxsd.models import LoraConfig, Transformer
    from jaxsd.models.lora import trainable_filter
    from jaxsd.train.optimizer import make_optimizer
    from jaxsd.train.state import create_train_state
    from jaxsd.train.step import make_train_step

    b, prompt, response, extra = a.batch, a.prompt, a.response, a.teacher_extra
    cfg = model_config(a.shape, a.layers, a.param_dtype, a.dtype, a.attention, a.remat)
    step_cfg = step_config(a.algo, a.chunk, a.topk_block)
    tx = make_optimizer(W.LR, weight_decay=W.WEIGHT_DECAY, clip_norm=W.GRAD_CLIP)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    lora = None
    if a.lora_rank:
        lora = LoraConfig(rank=a.lora_rank, alpha=2.0 * a.lora_rank, targets=a.lora_targets)
    graphdef, state, _ = create_train_state(
        lambda r: Transformer(cfg, rngs=r, lora=lora),
        tx,
        teacher_mode=step_cfg.teacher_mode,
        trainable=trainable_filter(lora),
    )
    batch = jax.device_put(make_batch(cfg, a.algo, b, prompt, response, extra))
    jax.block_until_ready((state, batch))
    init_s = time.perf_counter() - t0
    step = make_train_step(graphdef, tx, step_cfg)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(a.warmup):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    if a.trace:
        with jax.profiler.trace(a.trace, create_perfetto_trace=True):
            for _ in range(3):
                state, m = step(state, batch)
            jax.block_until_ready(m)
    peak_bytes = device_peak_bytes()  # before the matmul probe allocates anything
    measured = max(matmul_gflops(a.matmul_n, a.dtype) for _ in range(2))
    step_s = statistics.median(times)
    trainable = int(sum(x.size for x in jax.tree.leaves(state.params)))
    # With LoRA the base weights are the frozen part of the state, the adapters the trainable.
    n_params = int(sum(x.size for x in jax.tree.leaves(state.frozen))) if lora else trainable
    shape = W.shape(a.shape) | {"num_hidden_layers": cfg.num_layers}
    counts = W.param_counts(shape)
    if counts["total"] != n_params:
        raise RuntimeError(f"param count {n_params} != workload formula {counts['total']}")
    flops = W.step_flops(
        shape, batch=b, prompt=prompt, response=response, teacher_extra=extra, algo=a.algo
    )
    student_tokens = b * (prompt + response)
    teacher_tokens = b * (prompt + extra + response) if a.algo == "sdpo" else 0

    def gflops(key: str) -> float:
        return flops[key] / step_s / 1e9

    return {
        "bench": "train_step",
        "algorithm": a.algo,
        "shape": a.shape,
        "layers": cfg.num_layers,
        "batch": b,
        "prompt": prompt,
        "response": response,
        "teacher_extra": extra if a.algo == "sdpo" else 0,
        "param_dtype": a.param_dtype,
        "attention": a.attention,
        "remat": a.remat,
        "lora_rank": a.lora_rank,
        "lora_targets": list(a.lora_targets) if a.lora_rank else None,
        "trainable_params": trainable,
        "topk_block": a.topk_block or topk_block_width(cfg.vocab_size, W.TOP_K),
        "compute_dtype": a.dtype,
        "step_s": step_s,
        "min_step_s": min(times),
        "response_tokens_per_s": b * response / step_s,
        "tokens_per_s": (student_tokens + teacher_tokens) / step_s,
        "student_tokens_per_s": student_tokens / step_s,
        "first_step_s": compile_s,
        "init_s": init_s,
        "params": n_params,
        "params_by_group": counts,
        "steps": a.steps,
        "chunk_tokens": a.chunk,
        "model_gflop_per_step": flops["six_n"] / 1e9,
        "achieved_gflops": gflops("six_n"),
        "peak_gflops": a.peak_gflops,
        "peak_source": a.peak_source,
        # 6 N per student token + 2 N per teacher token (SDPO), N = all parameters.
        "mfu": gflops("six_n") / a.peak_gflops,
        # The convention behind the PyTorch 54 %: 6 N x student tokens only.
        "mfu_student_only": gflops("six_n_student_only") / a.peak_gflops,
        # The matmuls the step needs (layers on all tokens, head on the response, attention).
        "mfu_model_flops": gflops("model") / a.peak_gflops,
        "model_flops_gflop_per_step": flops["model"] / 1e9,
        "measured_matmul_gflops": measured,
        "mfu_vs_measured_matmul": gflops("six_n") / measured,
        "mfu_model_flops_vs_measured_matmul": gflops("model") / measured,
        "peak_device_bytes": peak_bytes,
        "loss": float(m["loss"][0]),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        # Cores this process may run on (taskset / cgroup pinning; XLA:CPU sizes its pools by it).
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg_1m_before": load_before,
        "load_avg_1m": os.getloadavg()[0],
    }


def bench_matmul(a: argparse.Namespace) -> dict[str, Any]:
    """Measured matmul peak (median of `--steps` products after a warm-up) vs the nominal one."""
    import jax

    tflops = matmul_gflops(a.matmul_n, a.dtype, repeats=max(a.steps, 3)) / 1e3
    return {
        "bench": "matmul_peak",
        "n": a.matmul_n,
        "dtype": a.dtype,
        "tflops": tflops,
        "nominal_tflops": a.peak_gflops / 1e3,
        "peak_source": a.peak_source,
        "fraction_of_nominal": tflops * 1e3 / a.peak_gflops,
        "device": str(jax.devices()[0].device_kind),
    }


def head_variant(
    variant: str, tokens: int, vocab: int, hidden: int, chunk: int, time_it: bool, dtype: str
) -> dict[str, Any]:
    """Value-and-grad of the token-mean top-k JSD head on random hidden states."""
    if variant == "torch_full":
        return torch_head(tokens, vocab, hidden, time_it, dtype)
    import jax
    import jax.numpy as jnp

    from jaxsd.train.head import chunked_head, head_on_logits

    b = 8
    r = tokens // b
    ks = jax.random.split(jax.random.key(0), 5)
    s_h = jax.random.normal(ks[0], (b, r, hidden), jnp.float32).astype(dtype)
    t_h = jax.random.normal(ks[1], (b, r, hidden), jnp.float32).astype(dtype)
    s_w = (0.05 * jax.random.normal(ks[2], (hidden, vocab), jnp.float32)).astype(dtype)
    t_w = (0.05 * jax.random.normal(ks[3], (hidden, vocab), jnp.float32)).astype(dtype)
    tok = jax.random.randint(ks[4], (b, r), 0, vocab)

    def loss(s_h, s_w):
        if variant == "chunked":
            out = chunked_head(s_h, s_w, tok, t_h, t_w, chunk_size=chunk, top_k=TOP_K)
        else:  # the naive version: materialise [B, R, V] logits for student and teacher
            logits = lambda h, w: jnp.einsum(  # noqa: E731
                "brh,hv->brv", h, w, preferred_element_type=jnp.float32
            )
            out = head_on_logits(logits(s_h, s_w), tok, logits(t_h, t_w), top_k=TOP_K)
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
        "dtype": dtype,
        "compile_s": time.perf_counter() - t0,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": int(
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        ),
    }
    if time_it:
        # In use, not the peak so far: the compile's autotuning scratch can exceed the inputs,
        # and peak - that peak then under-reports the head (19 MB on an H100 vs 0.82 GB temp).
        inputs_bytes = device_peak_bytes("bytes_in_use")
        peak_before = device_peak_bytes()
        jax.block_until_ready(compiled(s_h, s_w))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(s_h, s_w))
            times.append(time.perf_counter() - t0)
        result["time_s"] = statistics.median(times)
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = device_peak_bytes()
        result["device_peak_bytes"] = peak
        if peak is not None and inputs_bytes is not None:
            result["device_head_peak_bytes"] = peak - inputs_bytes
            # The run did not raise the process peak: its own peak is at most this.
            result["device_head_peak_is_upper_bound"] = peak == peak_before
    return result


def torch_head(tokens: int, vocab: int, hidden: int, time_it: bool, dtype: str) -> dict[str, Any]:
    """The naive PyTorch head (full logits, the SDPO code's recipe), on CUDA when present."""
    import torch
    from sdpo_torch import sdpo_topk_jsd

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    b, r = 8, tokens // 8

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dev, tdt)

    s_h, t_h = rand(b, r, hidden).requires_grad_(), rand(b, r, hidden)
    s_w, t_w = rand(hidden, vocab, scale=0.05).requires_grad_(), rand(hidden, vocab, scale=0.05)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        div = sdpo_topk_jsd(s_h @ s_w, t_h @ t_w, W.TOP_K, W.ALPHA)
        div.mean().backward()
        s_h.grad = s_w.grad = None
        sync()

    result: dict[str, Any] = {"variant": "torch_full", "tokens": tokens, "vocab": vocab,
                              "hidden": hidden, "dtype": dtype, "torch": torch.__version__,
                              "device": dev}  # fmt: skip
    if not time_it:
        return result
    if dev == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        inputs_bytes = torch.cuda.memory_allocated()
    step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    result["time_s"] = statistics.median(times)
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev == "cuda":
        result["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        result["device_head_peak_bytes"] = result["device_peak_bytes"] - inputs_bytes
    return result


def _subprocess(args: list[str]) -> dict[str, Any]:
    # $PY_TORCH: the torch variant's interpreter where jax and torch live apart (CPU smoke).
    py = os.environ.get("PY_TORCH", sys.executable) if "torch_full" in args else sys.executable
    t0 = time.perf_counter()
    out = subprocess.run([py, __file__, *args], capture_output=True, text=True, check=False)
    # Progress on stderr: five variants of ~10-30 s each, so a timeout shows how far it got.
    what = f"{args[1]} ({'timing' if '--time' in args else 'memory'})"
    print(f"head: {what} exit {out.returncode} after {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    if out.returncode != 0:
        return {"error": f"head variant {args} failed: {out.stderr[-1500:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(num: dict[str, Any], den: dict[str, Any], key: str) -> float | None:
    if num.get(key) and den.get(key):
        return num[key] / den[key]
    return None


def bench_head(a: argparse.Namespace) -> dict[str, Any]:
    common = ["--vocab", str(a.vocab), "--hidden", str(a.hidden), "--chunk", str(a.chunk),
              "--dtype", a.dtype]  # fmt: skip
    mem = {
        v: _subprocess(["--head-variant", v, "--tokens", str(a.tokens), *common])
        for v in ("chunked", "full")
    }
    variants = ("chunked", "full", "torch_full") if a.head_torch else ("chunked", "full")
    timed = {
        v: _subprocess(["--head-variant", v, "--tokens", str(a.time_tokens), "--time", *common])
        for v in variants
    }
    return {
        "bench": "distillation_head",
        "tokens": a.tokens,
        "vocab": a.vocab,
        "hidden": a.hidden,
        "dtype": a.dtype,
        "chunk_tokens": a.chunk,
        "memory": mem,
        "peak_ratio_full_over_chunked": _ratio(mem["full"], mem["chunked"], "peak_bytes"),
        "time_tokens": a.time_tokens,
        "timing": timed,
        "time_ratio_chunked_over_full": _ratio(timed["chunked"], timed["full"], "time_s"),
        "device_peak_ratio_full_over_chunked": _ratio(
            timed["full"], timed["chunked"], "device_head_peak_bytes"
        ),
        **(
            {
                "time_ratio_chunked_over_torch": _ratio(
                    timed["chunked"], timed["torch_full"], "time_s"
                ),
                "device_peak_ratio_torch_over_chunked": _ratio(
                    timed["torch_full"], timed["chunked"], "device_head_peak_bytes"
                ),
            }
            if a.head_torch
            else {}
        ),
        "load_avg_1m": os.getloadavg()[0],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", choices=("sdpo", "grpo"), default="sdpo")
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--layers", type=int, help="cut the shape's depth (e.g. 8b on one GPU)")
    p.add_argument("--batch", type=int, default=W.BATCH, help="sequences per step")
    p.add_argument("--prompt", type=int, default=W.PROMPT, help="student prompt tokens")
    p.add_argument("--response", type=int, default=W.RESPONSE, help="response tokens")
    p.add_argument("--teacher-extra", type=int, default=W.TEACHER_EXTRA)
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPU)")
    p.add_argument("--param-dtype", default="float32", help="parameter (master) dtype")
    p.add_argument(
        "--attention", choices=("jaxsd", "xla", "cudnn"), default="jaxsd",
        help="attention implementation (cudnn: fused flash attention, NVIDIA + bf16)",
    )  # fmt: skip
    p.add_argument("--remat", action="store_true", help="recompute layer activations in bwd")
    p.add_argument(
        "--lora-rank", type=int, default=0,
        help="train LoRA adapters of this rank (alpha = 2 x rank) instead of every weight",
    )  # fmt: skip
    p.add_argument(
        "--lora-targets", default="q,k,v,o,gate,up,down", help="projections carrying adapters"
    )
    p.add_argument(
        "--topk-block",
        type=int,
        help="width of the logit blocks the exact top-k prunes (default: chosen from V and k)",
    )
    p.add_argument("--trace", help="also profile 3 steps into this folder (perfetto trace)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256, help="tokens per LM-head chunk")
    p.add_argument("--matmul-only", action="store_true", help="measure the matmul peak only")
    p.add_argument("--matmul-n", type=int, default=4096, help="n of the n^3 matmul probe")
    p.add_argument("--head", action="store_true", help="chunked vs full-logit head benchmark")
    p.add_argument("--head-torch", action="store_true", help="--head also times naive torch")
    p.add_argument(
        "--head-variant", choices=("chunked", "full", "torch_full"), help=argparse.SUPPRESS
    )
    p.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    peak = p.add_mutually_exclusive_group()
    peak.add_argument(
        "--peak-gflops",
        type=float,
        help="device peak for MFU (default: 138 on CPU, else the known dense bf16 peak)",
    )
    peak.add_argument("--peak-tflops", type=float, help="same in TFLOP/s (H100 SXM bf16: 989)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--time-tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=128)
    a = p.parse_args(argv)
    if a.peak_tflops is not None:
        a.peak_gflops = a.peak_tflops * 1e3
    for name in ("batch", "prompt", "response", "steps", "chunk", "matmul_n"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.layers is not None and a.layers < 1:
        p.error(f"--layers must be >= 1, got {a.layers}")
    if a.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0 (0: train every weight), got {a.lora_rank}")
    from jaxsd.models.lora import LORA_TARGETS
    from jaxsd.train.validate import lora_targets

    a.lora_targets = lora_targets(a.lora_targets)
    if not a.lora_targets or not set(a.lora_targets) <= set(LORA_TARGETS):
        p.error(f"--lora-targets must be a comma-separated subset of {','.join(LORA_TARGETS)}")
    if not (a.head_variant or a.head):  # the head benchmarks report no MFU
        import jax

        device = jax.devices()[0]
        try:
            a.peak_gflops, a.peak_source = W.resolve_peak_gflops(
                a.peak_gflops, device.platform, str(device.device_kind), a.dtype
            )
        except ValueError as e:
            p.error(str(e))
    return a


def main() -> None:
    a = parse_args()
    if a.head_variant:
        result = head_variant(a.head_variant, a.tokens, a.vocab, a.hidden, a.chunk, a.time, a.dtype)
    elif a.head:
        result = bench_head(a)
    elif a.matmul_only:
        result = bench_matmul(a)
    else:
        result = bench_step(a)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
