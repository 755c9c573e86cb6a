"""PyTorch peer of bench/train_step.py for any shape/workload, on CUDA when there is one.

The same step a PyTorch user would write, with the same flags as our bench so the two rows
compare like for like (GPU rows: bench/gpu_rows.sh):
- `--algo sdpo`: transformers' Qwen3ForCausalLM (untied head), student fwd/bwd + no-grad
  teacher fwd over the response positions only (`logits_to_keep`), full-vocabulary
  log-softmax then top-k + tail JSD (the SDPO/verl recipe, bench/peers/sdpo_torch.py), IS
  clip 2, token-mean, AdamW + clip 1.0, `torch._foreach_lerp_` EMA teacher;
- `--algo grpo`: one student forward, the clipped surrogate with eps 0.2 / 0.28 on the
  sampled tokens' log-probs (TRL's `dapo` loss, beta 0: no reference model), token-mean,
  AdamW + clip.
Precision mirrors ours: `--param-dtype float32 --dtype bfloat16` = fp32 master weights under
`torch.autocast(bfloat16)`; `--param-dtype bfloat16` = bf16 weights, no autocast. AdamW is
the fused CUDA kernel on GPU (what transformers' Trainer picks by default there).
Prints one JSON object, the same fields as bench/train_step.py where they mean the same.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
import transformers
import workload as W
from sdpo_torch import sdpo_topk_jsd


def make_model(a: argparse.Namespace, device: str) -> transformers.Qwen3ForCausalLM:
    """Random Qwen3 of the workload shape (untied head), built on `device`, train mode."""
    torch.manual_seed(W.SEED)
    s = W.shape(a.shape) | ({"num_hidden_layers": a.layers} if a.layers else {})
    max_len = max(4096, a.prompt + a.teacher_extra + a.response)
    cfg = transformers.Qwen3Config(**s, tie_word_embeddings=False,
                                   max_position_embeddings=max_len)  # fmt: skip
    with torch.device(device):  # initialise in place: no host copy of a multi-GB model
        model = transformers.Qwen3ForCausalLM(cfg)
    return model.to(getattr(torch, a.param_dtype)).train()


def make_batch(a: argparse.Namespace, vocab: int, device: str) -> dict[str, torch.Tensor]:
    """Random ids: student = prompt ⊕ response, teacher = longer reprompt ⊕ response."""
    g = torch.Generator().manual_seed(W.SEED)
    b, p, r, e = a.batch, a.prompt, a.response, a.teacher_extra
    response = torch.randint(0, vocab, (b, r), generator=g)
    batch = {
        "student_ids": torch.cat([torch.randint(0, vocab, (b, p), generator=g), response], 1),
        "teacher_ids": torch.cat([torch.randint(0, vocab, (b, p + e), generator=g), response], 1),
        "response_ids": response,
        "response_mask": torch.ones(b, r),
        "old_logp": -torch.rand(b, r, generator=g) * math.log(vocab),
        "advantages": torch.linspace(-1.0, 1.0, b),
    }
    return {k: v.to(device) for k, v in batch.items()}


def response_logits(model: torch.nn.Module, ids: torch.Tensor, r: int) -> torch.Tensor:
    """Logits predicting the last r tokens, [B, r, V]; only those positions go through the head."""
    return model(input_ids=ids, logits_to_keep=r + 1).logits[:, :-1]


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]


def make_step(a: argparse.Namespace, model: torch.nn.Module, batch: dict, device: str) -> Any:
    """One optimiser step of `a.algo`; returns a callable that blocks until the step is done."""
    fused = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR, weight_decay=W.WEIGHT_DECAY, fused=fused)
    params = list(model.parameters())
    mixed = a.dtype != a.param_dtype
    autocast = (lambda: torch.autocast(device, dtype=getattr(torch, a.dtype))) if mixed else (
        contextlib.nullcontext)  # fmt: skip
    r, mask = a.response, batch["response_mask"]
    teacher = None
    if a.algo == "sdpo":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        t_params = list(teacher.parameters())

    def loss_sdpo() -> torch.Tensor:
        with autocast():
            s_logits = response_logits(model, batch["student_ids"], r)
            with torch.no_grad():
                t_logits = response_logits(teacher, batch["teacher_ids"], r)
        per_tok = sdpo_topk_jsd(s_logits, t_logits, W.TOP_K, W.ALPHA)
        logp = token_logp(s_logits, batch["response_ids"])
        is_w = torch.exp(torch.clamp(logp - batch["old_logp"], -20, 20)).clamp(max=W.IS_CLIP)
        return (per_tok * is_w.detach() * mask).sum() / mask.sum()

    def loss_grpo() -> torch.Tensor:
        with autocast():
            logits = response_logits(model, batch["student_ids"], r)
        logp = token_logp(logits, batch["response_ids"])
        ratio = torch.exp(logp - batch["old_logp"])
        adv = batch["advantages"][:, None]
        pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - 0.2, 1 + 0.28) * adv)
        return (pg * mask).sum() / mask.sum()

    loss_fn = {"sdpo": loss_sdpo, "grpo": loss_grpo}[a.algo]

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, W.GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if teacher is not None:
            with torch.no_grad():
                torch._foreach_lerp_(t_params, params, W.EMA_RATE)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def matmul_gflops(n: int, dtype: str, device: str, repeats: int = 5) -> float:
    x = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        x @ x
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first one warms up
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def run(a: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = make_model(a, device)
    batch = make_batch(a, model.config.vocab_size, device)
    step = make_step(a, model, batch, device)
    init_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = step()
    first_s = time.perf_counter() - t0
    wall, _ = W.time_steps(step, a.steps, warmup=a.warmup)
    peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else None
    measured = max(matmul_gflops(a.matmul_n, a.dtype, device) for _ in range(2))
    step_s = statistics.median(wall)
    s = W.shape(a.shape) | ({"num_hidden_layers": a.layers} if a.layers else {})
    n_params = sum(p.numel() for p in model.parameters())
    flops = W.step_flops(s, batch=a.batch, prompt=a.prompt, response=a.response,
                         teacher_extra=a.teacher_extra, algo=a.algo)  # fmt: skip
    student = a.batch * (a.prompt + a.response)
    teacher = a.batch * (a.prompt + a.teacher_extra + a.response) if a.algo == "sdpo" else 0
    peak = a.peak_gflops
    return {
        "bench": "torch_step", "algorithm": a.algo, "shape": a.shape,
        "layers": s["num_hidden_layers"], "batch": a.batch, "prompt": a.prompt,
        "response": a.response, "teacher_extra": a.teacher_extra if a.algo == "sdpo" else 0,
        "param_dtype": a.param_dtype, "compute_dtype": a.dtype,
        "step_s": step_s, "min_step_s": min(wall),
        "response_tokens_per_s": a.batch * a.response / step_s,
        "tokens_per_s": (student + teacher) / step_s, "student_tokens_per_s": student / step_s,
        "first_step_s": first_s, "init_s": init_s, "params": n_params, "steps": a.steps,
        "mfu": flops["six_n"] / step_s / 1e9 / peak,
        "mfu_student_only": flops["six_n_student_only"] / step_s / 1e9 / peak,
        "mfu_model_flops": flops["model"] / step_s / 1e9 / peak,
        "peak_gflops": peak, "peak_source": a.peak_source, "measured_matmul_gflops": measured,
        "mfu_model_flops_vs_measured_matmul": flops["model"] / step_s / 1e9 / measured,
        "peak_device_bytes": peak_bytes, "loss": loss,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "torch_threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)),
        "load_avg_1m": os.getloadavg()[0],
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", choices=("sdpo", "grpo"), default="sdpo")
    p.add_argument("--shape", choices=sorted(W.SHAPES), default="tiny")
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int, default=W.BATCH)
    p.add_argument("--prompt", type=int, default=W.PROMPT)
    p.add_argument("--response", type=int, default=W.RESPONSE)
    p.add_argument("--teacher-extra", type=int, default=W.TEACHER_EXTRA)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--matmul-n", type=int, default=4096)
    peak = p.add_mutually_exclusive_group()
    peak.add_argument("--peak-gflops", type=float, help="default: 138 on CPU, else known bf16 peak")
    peak.add_argument("--peak-tflops", type=float)
    a = p.parse_args(argv)
    if a.peak_tflops is not None:
        a.peak_gflops = a.peak_tflops * 1e3
    cuda = torch.cuda.is_available()
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    try:
        a.peak_gflops, a.peak_source = W.resolve_peak_gflops(
            a.peak_gflops, "gpu" if cuda else "cpu", kind, a.dtype
        )
    except ValueError as e:
        p.error(str(e))
    if a.param_dtype == "bfloat16" and a.dtype == "float32":
        p.error("--param-dtype bfloat16 needs --dtype bfloat16 (no fp32 compute on bf16 weights)")
    return a


if __name__ == "__main__":
    W.emit(run(parse_args()))
