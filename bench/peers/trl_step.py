"""PyTorch peer of bench/train_step.py: the issue-9 workload as a PyTorch/TRL user would run it.

Runs inside the throwaway `trl` virtualenv (torch==2.13.0 CPU, transformers, trl), never in
jaxsd's .venv. Variants, each timed on the same fixed batch (no generation):
- `torch_sdpo`: hand-written SDPO step the way the SDPO (verl) code does it: full-vocabulary
  log-softmax, then the student's top-k, tail = log(1 - sum top-k) clamped, JSD(alpha=0.5),
  IS weight, token-mean, AdamW + grad clip, EMA teacher (the issue's reference number).
- `trl_sdpo`: TRL's own `SDPOTrainer.compute_loss` (trl.experimental.sdpo, topk_logits mode,
  tail bucket, is_clip, EMA teacher through its `SyncTeacherModelCallback`) on the fixed batch.
- `trl_gkd`: the same step with TRL's own GKD loss (`GKDTrainer.generalized_jsd_loss`,
  full-vocabulary JSD, beta=0.5) in place of the top-k divergence.
- `trl_grpo`: TRL's own `GRPOTrainer.compute_loss` on fixed pre-generated completions
  (the learner half of GRPO), then backward, clip, AdamW.
Prints one JSON object: {"variants": {name: {"step_s", "response_tokens_per_s", ...}}}.
A variant the installed TRL cannot run records {"error": "..."} instead of a number.

On a CUDA machine everything runs there (`--dtype bfloat16`: fp32 weights under
`torch.autocast(bfloat16)`, what `Trainer(bf16=True)` does through accelerate; AdamW is the
Trainer's default, the hand-written steps use the fused CUDA AdamW like bench/peers/torch_step.py).
The GPU rows (bench/gpu_rows.sh) carry trl and datasets as wheels.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib
import io
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
import workload as W
from sdpo_torch import sdpo_topk_jsd

VARIANTS = ("torch_sdpo", "trl_sdpo", "trl_gkd", "trl_grpo")
# Which of our steps each variant is comparable with (compare_peers pairs like with like).
ALGORITHM = {"torch_sdpo": "sdpo", "trl_sdpo": "sdpo", "trl_gkd": "sdpo", "trl_grpo": "grpo"}


@dataclass(frozen=True)
class Run:
    """Where and how every variant runs: model shape, torch device, autocast dtype (or None)."""

    shape: str
    device: str = "cpu"
    autocast_dtype: torch.dtype | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.autocast_dtype)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def make_run(shape: str, dtype: str) -> Run:
    """CUDA when there is one; bf16 = autocast over fp32 weights (CUDA only: CPU stays fp32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "bfloat16" and device == "cpu":
        raise ValueError("--dtype bfloat16 needs a CUDA device (the CPU workload is float32)")
    return Run(shape, device, torch.bfloat16 if dtype == "bfloat16" else None)


def make_model(run: Run) -> transformers.Qwen3ForCausalLM:
    """Random Qwen3 of the run's shape (untied head), float32, on the run's device, train mode."""
    torch.manual_seed(W.SEED)
    cfg = transformers.Qwen3Config(**W.shape(run.shape), tie_word_embeddings=False,
                                   max_position_embeddings=4096)  # fmt: skip
    with torch.device(run.device):
        return transformers.Qwen3ForCausalLM(cfg).float().train()


def make_batch(vocab: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random token ids: student = prompt ⊕ response, teacher = longer reprompt ⊕ response."""
    g = torch.Generator().manual_seed(W.SEED)
    b, p, r, e = W.BATCH, W.PROMPT, W.RESPONSE, W.TEACHER_EXTRA
    response = torch.randint(0, vocab, (b, r), generator=g)
    prompt = torch.randint(0, vocab, (b, p), generator=g)
    reprompt = torch.randint(0, vocab, (b, p + e), generator=g)
    batch = {
        "student_ids": torch.cat([prompt, response], 1),
        "teacher_ids": torch.cat([reprompt, response], 1),
        "prompt_ids": prompt,
        "response_ids": response,
        "response_mask": torch.ones(b, r),
        # Stand-in for the rollout engine's log-probs (the step takes them as data).
        "old_logp": -torch.rand(b, r, generator=g) * math.log(vocab),
    }
    return {k: v.to(device) for k, v in batch.items()}


def response_logits(model: torch.nn.Module, ids: torch.Tensor, r: int) -> torch.Tensor:
    """Logits predicting the last r tokens, [B, r, V]; only those positions go through the head."""
    return model(input_ids=ids, logits_to_keep=r + 1).logits[:, :-1]


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]


def make_distill_step(model, divergence, batch, run: Run) -> Any:
    """One SDPO optimiser step: student fwd/bwd, no-grad teacher fwd, AdamW + clip, EMA."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR, weight_decay=W.WEIGHT_DECAY,
                            fused=run.device == "cuda")  # fmt: skip
    s_params, t_params = list(model.parameters()), list(teacher.parameters())
    r, mask = W.RESPONSE, batch["response_mask"]

    def step() -> torch.Tensor:
        with run.autocast():
            s_logits = response_logits(model, batch["student_ids"], r)
            with torch.no_grad():
                t_logits = response_logits(teacher, batch["teacher_ids"], r)
        per_tok = divergence(s_logits, t_logits, batch["response_ids"])
        logp = token_logp(s_logits, batch["response_ids"])
        is_w = torch.exp(torch.clamp(logp - batch["old_logp"], -20, 20)).clamp(max=W.IS_CLIP)
        loss = (per_tok * is_w.detach() * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_params, W.GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(t_params, s_params, W.EMA_RATE)
        run.sync()
        return loss.detach()

    return step


def torch_sdpo(run: Run) -> Any:
    model = make_model(run)
    batch = make_batch(model.config.vocab_size, run.device)
    divergence = lambda s, t, _tok: sdpo_topk_jsd(s, t, W.TOP_K, W.ALPHA)  # noqa: E731
    return make_distill_step(model, divergence, batch, run)


def _gkd_loss_fn() -> Any:
    """TRL's GKD generalized JSD (its module moved between releases; try both homes)."""
    homes = ("trl.experimental.gkd", "trl.experimental.gkd.gkd_trainer", "trl.trainer.gkd_trainer",
             "trl")  # fmt: skip
    for mod in homes:
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(mod).GKDTrainer.generalized_jsd_loss
    raise ImportError("this trl has no GKDTrainer (looked in trl.experimental.gkd and trl)")


def trl_gkd(run: Run) -> Any:
    jsd = _gkd_loss_fn()
    model = make_model(run)
    batch = make_batch(model.config.vocab_size, run.device)

    def divergence(s, t, tokens):
        # reduction="none" gives [B, R, V]; sum over V for per-token JSD (beta=0.5 is JSD).
        return jsd(s, t, labels=None, beta=W.ALPHA, temperature=1.0, reduction="none").sum(-1)

    return make_distill_step(model, divergence, batch, run)


def _tokenizer(vocab: int) -> Any:
    """A local word-level tokenizer of `vocab` ids (the hub is unreachable; TRL wants one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )


def _trainer(trainer_cls: Any, config_cls: Any, run: Run, **config: Any) -> Any:
    """A TRL trainer on the random model saved to a folder (TRL builds its teacher from that)."""
    from datasets import Dataset

    folder = tempfile.mkdtemp(prefix="jaxsd-trl-")
    model = make_model(run)
    model.save_pretrained(folder)
    tok = _tokenizer(model.config.vocab_size)
    tok.save_pretrained(folder)
    args = config_cls(
        output_dir=folder, per_device_train_batch_size=W.BATCH, num_generations=W.BATCH,
        max_completion_length=W.RESPONSE, learning_rate=W.LR, weight_decay=W.WEIGHT_DECAY,
        max_grad_norm=W.GRAD_CLIP, report_to=[], use_cpu=run.device == "cpu",
        logging_steps=10**6, save_strategy="no", bf16=run.autocast_dtype == torch.bfloat16,
        gradient_checkpointing=False, **config,
    )  # fmt: skip

    def zero_reward(completions, **kw):  # rewards are never computed: no generation here
        return [0.0] * len(completions)

    data = Dataset.from_dict({"prompt": ["w2 w3"] * W.BATCH})
    trainer = trainer_cls(model=folder, reward_funcs=[zero_reward], args=args, train_dataset=data,
                          processing_class=tok)  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    # Trainer.training_step sets this before compute_loss; we call compute_loss directly.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _fixed_inputs(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """What TRL's `_prepare_inputs` would hand `compute_loss` after generation, for our batch
    (already on `device`)."""
    b, p, r = W.BATCH, W.PROMPT, W.RESPONSE
    ones = functools.partial(torch.ones, device=device)  # every token real: no padding
    return {
        "prompt_ids": batch["prompt_ids"], "prompt_mask": ones(b, p, dtype=torch.long),
        "completion_ids": batch["response_ids"], "completion_mask": ones(b, r, dtype=torch.long),
        "teacher_input_ids": batch["teacher_ids"],
        "teacher_attention_mask": ones(b, p + W.TEACHER_EXTRA + r, dtype=torch.long),
        "old_per_token_logps": batch["old_logp"],
        "advantages": torch.linspace(-1.0, 1.0, b, device=device),
        "num_items_in_batch": torch.tensor(b * r, device=device),
    }  # fmt: skip


def _trainer_step(trainer: Any, inputs: dict[str, torch.Tensor], callback: str | None,
                  run: Run) -> Any:  # fmt: skip
    """compute_loss + backward + clip + AdamW, then the named step-end callback (TRL's EMA).

    Under the run's autocast: Trainer's training loop gets it from accelerate's prepared model,
    which this direct call of compute_loss bypasses.
    """
    model, opt = trainer.model, trainer.optimizer
    hooks = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == callback]
    if callback is not None and not hooks:
        raise RuntimeError(f"{type(trainer).__name__} has no {callback} callback to time")
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step() -> torch.Tensor:
        with run.autocast():
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, W.GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        for hook in hooks:
            hook.on_step_end(trainer.args, trainer.state, trainer.control, model=model)
        run.sync()
        return loss.detach()

    return step


def trl_sdpo(run: Run) -> Any:
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    trainer = _trainer(
        SDPOTrainer, SDPOConfig, run, distillation_mode="topk_logits",
        distillation_topk=W.TOP_K, distillation_alpha=W.ALPHA, distillation_add_tail=True,
        distillation_is_clip=W.IS_CLIP, distillation_weight=1.0, teacher_model_kind="ema",
        teacher_update_rate=W.EMA_RATE, teacher_sync_steps=1,
    )  # fmt: skip
    batch = make_batch(trainer.model.config.vocab_size, run.device)
    return _trainer_step(trainer, _fixed_inputs(batch, run.device), "SyncTeacherModelCallback", run)


def trl_grpo(run: Run) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    trainer = _trainer(GRPOTrainer, GRPOConfig, run, beta=0.0, epsilon=0.2, epsilon_high=0.28,
                       loss_type="dapo")  # fmt: skip
    batch = make_batch(trainer.model.config.vocab_size, run.device)
    return _trainer_step(trainer, _fixed_inputs(batch, run.device), None, run)


def run_variant(name: str, run: Run, steps: int, warmup: int = 1) -> dict[str, Any]:
    build = {"torch_sdpo": torch_sdpo, "trl_sdpo": trl_sdpo, "trl_gkd": trl_gkd,
             "trl_grpo": trl_grpo}[name]  # fmt: skip
    cuda = run.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        # TRL prints banners/warnings on stdout; keep stdout for the one JSON object.
        with contextlib.redirect_stdout(io.StringIO()):
            step = build(run)
            times = W.time_steps(step, steps, warmup)
        peak = {"device_peak_bytes": torch.cuda.max_memory_allocated()} if cuda else {}
        return W.step_record(times, algorithm=ALGORITHM[name], **peak)
    except Exception as e:  # a peer API that moved is a result to report, not a crash
        return W.error_record(e)
    finally:
        gc.collect()  # the variant's model, optimiser state and trainer go before the next


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(W.SHAPES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="bfloat16: autocast over fp32 weights, CUDA only")  # fmt: skip
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {VARIANTS}")  # fmt: skip
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown --variants {sorted(unknown)}; use a subset of {VARIANTS}")
    try:
        run = make_run(args.shape, args.dtype)
    except ValueError as e:
        ap.error(str(e))
    with torch.device("meta"):  # shape only, no memory: parameter count and attention kernel
        meta = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**W.shape(args.shape), tie_word_embeddings=False)
        )
    W.emit({
        "peer": "trl",
        "shape": args.shape,
        "layers": meta.config.num_hidden_layers,
        "params": sum(p.numel() for p in meta.parameters()),
        "versions": W.versions("torch", "transformers", "trl", "accelerate", "datasets"),
        "device": torch.cuda.get_device_name() if run.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": meta.config._attn_implementation,
        "cpu_count": os.cpu_count(),
        "variants": {n: run_variant(n, run, args.steps, args.warmup) for n in names},
    })  # fmt: skip


if __name__ == "__main__":
    main()
