"""Optimizer: AdamW (wd 0.01), linear warm-up then constant or cosine, clip 1.0 (METHODS §10)."""

from __future__ import annotations

import optax

__all__ = ["make_optimizer", "make_schedule"]


def make_schedule(
    learning_rate: float,
    *,
    warmup_steps: int = 10,
    kind: str = "constant",
    total_steps: int | None = None,
    final_fraction: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then constant or cosine.

    The paper setting is lr 1e-5, 10 warm-up steps, constant. Cosine decays to
    `final_fraction * learning_rate` at `total_steps`.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate={learning_rate} must be > 0")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if kind == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, warmup_steps),
                optax.constant_schedule(learning_rate),
            ],
            boundaries=[warmup_steps],
        )
    if kind == "cosine":
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(
                f"cosine schedule needs total_steps > warmup_steps={warmup_steps}, "
                f"got total_steps={total_steps}"
            )
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=total_steps,
            end_value=final_fraction * learning_rate,
        )
    raise ValueError(f"schedule kind={kind!r} unknown; use 'constant' or 'cosine'")


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping (None = off) followed by AdamW, as in the SDPO/verl recipe."""
    parts = []
    if clip_norm is not None:
        if clip_norm <= 0:
            raise ValueError(f"clip_norm={clip_norm} must be > 0 (None turns clipping off)")
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
