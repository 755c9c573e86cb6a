"""Supervised fine-tuning: next-token cross-entropy on assistant-response tokens only.

Used to make the shipped tiny base model (scripts/make_base_model.py). An example is a chat
(system/user turns) plus the assistant's response; the prompt is rendered exactly as the
rollouts render it (`chat_token_ids`: chat template + generation prompt), the response is
appended as `response + <|im_end|>` — the same tokens the template writes for an assistant
turn — and only those response tokens carry loss. Batches are right-padded to a multiple of
`pad_multiple` so a run compiles a handful of shapes, and the step is one jitted function of
(params, optimizer state, batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsd.tasks.reprompt import chat_token_ids

Messages = Sequence[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example: `input_ids` and a 0/1 `loss_mask` (1 = assistant token)."""

    input_ids: list[int]
    loss_mask: list[int]


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """AdamW with linear warm-up then cosine decay to `final_lr_fraction * lr`."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0
    pad_multiple: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"SFTConfig.lr={self.lr} must be > 0")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"SFTConfig.warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})"
            )


def encode_example(
    tokenizer: Any, messages: Messages, response: str, *, max_len: int = 1024
) -> Example:
    """Prompt ids (chat template + generation prompt) + response ids + end-of-turn id."""
    prompt_ids = chat_token_ids(tokenizer, messages, max_tokens=max_len)
    end_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], end_id]
    ids = prompt_ids + response_ids
    if len(ids) > max_len:
        raise ValueError(
            f"example has {len(ids)} tokens > max_len={max_len}; raise max_len or shorten it"
        )
    return Example(ids, [0] * len(prompt_ids) + [1] * len(response_ids))


def pad_batch(examples: Sequence[Example], pad_id: int, pad_multiple: int = 16) -> dict:
    """Right-pad to the longest example rounded up to `pad_multiple` -> int32 [B, T] arrays."""
    if not examples:
        raise ValueError("pad_batch got no examples")
    longest = max(len(e.input_ids) for e in examples)
    t = -(-longest // pad_multiple) * pad_multiple
    ids_BxT = np.full((len(examples), t), pad_id, np.int32)
    loss_mask_BxT = np.zeros((len(examples), t), np.int32)
    attention_mask_BxT = np.zeros((len(examples), t), np.int32)
    for i, e in enumerate(examples):
        ids_BxT[i, : len(e.input_ids)] = e.input_ids
        loss_mask_BxT[i, : len(e.loss_mask)] = e.loss_mask
        attention_mask_BxT[i, : len(e.input_ids)] = 1
    return {
        "input_ids": ids_BxT,
        "loss_mask": loss_mask_BxT,
        "attention_mask": attention_mask_BxT,
    }


def response_nll(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(token | prefix) over loss-masked tokens, their count)."""
    ids_BxT = batch["input_ids"]
    logits_BxTxV = model(ids_BxT, batch["attention_mask"])
    chex.assert_rank(logits_BxTxV, 3)
    # Position t predicts token t+1, so the target's own mask decides whether it counts.
    logp_BxTm1xV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    target_logp_BxTm1 = jnp.take_along_axis(logp_BxTm1xV, ids_BxT[:, 1:, None], axis=-1)[..., 0]
    mask_BxTm1 = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return -jnp.sum(target_logp_BxTm1 * mask_BxTm1), jnp.sum(mask_BxTm1)


def make_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; no weight decay on 1-D params (norm scales)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.final_lr_fraction * cfg.lr,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> Callable:
    """Jitted (params, opt_state, batch) -> (params, opt_state, {"nll_sum", "count"})."""

    def loss_fn(params, batch):
        nll_sum, count = response_nll(nnx.merge(graphdef, params), batch)
        return nll_sum / jnp.maximum(count, 1.0), (nll_sum, count)

    def step(params, opt_state, batch):
        grads, (nll_sum, count) = jax.grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"nll_sum": nll_sum, "count": count}

    return jax.jit(step, donate_argnums=(0, 1))


def batch_order(
    lengths: Sequence[int], steps: int, batch_size: int, seed: int, group: int = 8
) -> np.ndarray:
    """[steps, batch_size] example indices: seeded shuffles, epoch after epoch, and within
    each window of `group` batches the examples sorted by length (less padding per batch)."""
    n = len(lengths)
    if n < 1:
        raise ValueError("no training examples")
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    flat = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    window = batch_size * max(1, group)
    lengths = np.asarray(lengths)
    for start in range(0, need, window):
        chunk = flat[start : start + window]
        flat[start : start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = flat.reshape(steps, batch_size)
    # Shuffle batches inside each window so length does not rise steadily within it.
    for start in range(0, steps, max(1, group)):
        batches[start : start + group] = rng.permutation(batches[start : start + group])
    return batches


def train_sft(
    model: nnx.Module,
    examples: Sequence[Example],
    cfg: SFTConfig,
    *,
    pad_id: int,
    callback: Callable[[int, nnx.Module, float], bool] | None = None,
    callback_every: int = 50,
) -> tuple[nnx.Module, list[float]]:
    """Run `cfg.steps` SFT steps (fewer if `callback` returns True = stop); returns the model
    (a new one holding the trained params) and the mean response NLL of each step.

    `callback(step, model, recent_nll)` runs every `callback_every` steps and at the end.
    """
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)  # the step donates its input; keep `model` valid
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(graphdef, optimizer)
    order = batch_order([len(e.input_ids) for e in examples], cfg.steps, cfg.batch_size, cfg.seed)
    pending, losses = [], []
    for i, idx in enumerate(order, start=1):
        batch = pad_batch([examples[j] for j in idx], pad_id, cfg.pad_multiple)
        params, opt_state, metrics = step_fn(params, opt_state, batch)
        pending.append(metrics)  # pulled to the host lazily: keeps dispatch ahead
        if i % callback_every and i != cfg.steps:
            continue
        for m in jax.device_get(pending):
            losses.append(float(m["nll_sum"] / max(float(m["count"]), 1.0)))
        pending = []
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"SFT loss is {losses[-1]} at step {i}; lower the lr")
        if callback is not None:
            recent = float(np.mean(losses[-callback_every:]))
            if callback(i, nnx.merge(graphdef, params), recent):
                break
    return nnx.merge(graphdef, params), losses
