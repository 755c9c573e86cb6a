"""The jitted train step: one pure `train_step(state, batch) -> (state, metrics)` for every
algorithm (DESIGN §1). Static switches (`StepConfig`) pick the loss terms (`train/loss.py`);
everything per-step is in the batch. Micro-batches accumulate gradients over slices of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxsd.train.batch import TrainBatch
from jaxsd.train.loss import Metrics, global_norms, make_loss_fn
from jaxsd.train.state import TrainState, ema_update
from jaxsd.train.step_config import POLICY_LOSSES, StepConfig

__all__ = [
    "POLICY_LOSSES",
    "StepConfig",
    "make_loss_fn",
    "make_teacher_forward",
    "make_train_step",
    "state_finite_flags",
]

# Metrics reported as (max, 1) rather than (sum, count): micro-batches combine them by max.
MAX_METRICS = ("rollout_is/ratio_max",)
_DEFAULT_CONFIG = StepConfig()


def _combine(acc, out):
    """Accumulate one micro-batch's (value, aux), grads: sums, except `MAX_METRICS` (max)."""
    total = jax.tree.map(jnp.add, acc, out)
    (_, (_, metrics)), _ = total
    (_, (_, acc_m)), _ = acc
    (_, (_, out_m)), _ = out
    for key in MAX_METRICS:
        if key in metrics:
            metrics[key] = (jnp.maximum(acc_m[key][0], out_m[key][0]), out_m[key][1])
    return total


def _micro_slices(batch: TrainBatch, n: int) -> TrainBatch:
    """[B, ...] -> [n, B/n, ...] with strided rows, so each slice stays split over devices."""
    b = batch.student_tokens.shape[0]
    if b % n:
        raise ValueError(f"batch size {b} is not divisible by micro_batches={n}")
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1), batch)


def make_teacher_forward(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """Jitted `(teacher, frozen, batch) -> scalar`: the teacher's decoder layers over the batch's
    teacher inputs, at the response rows, as the loss runs them. The train step fuses this
    forward with the rest; this lone copy exists to time it (`profile_teacher_forward`)."""

    @jax.jit
    def forward(teacher: nnx.State, frozen: nnx.State, batch: TrainBatch) -> jax.Array:
        model = nnx.merge(graphdef, teacher, frozen)
        h_BxRxH = model.hidden_states(
            batch.teacher_tokens, batch.teacher_mask, batch.teacher_positions,
            output_index=batch.teacher_index,
        )  # fmt: skip
        return jnp.sum(h_BxRxH.astype(jnp.float32))  # a scalar out, so nothing is skipped

    return forward


STATE_FINITE_PREFIX = "state_finite/"  # metrics the host checks and drops before logging


def _all_finite(tree: Any) -> jax.Array:
    """One bool: every inexact leaf of `tree` is finite (a reduction per leaf, then an and)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = [jnp.all(jnp.isfinite(x)) for x in leaves]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def state_finite_flags(state: TrainState) -> dict[str, jax.Array]:
    """`{state_finite/<part>: 1.0 or 0.0}` for the parts a checkpoint would store."""
    parts = {"params": state.params, "opt_state": state.opt_state, "teacher": state.teacher}
    return {
        STATE_FINITE_PREFIX + name: _all_finite(tree).astype(jnp.float32)
        for name, tree in parts.items()
        if tree is not None
    }


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: StepConfig = _DEFAULT_CONFIG,
    *,
    state_shardings: TrainState | None = None,
    batch_shardings: TrainBatch | None = None,
    schedule: optax.Schedule | None = None,
    donate: bool = True,
) -> Callable[[TrainState, TrainBatch], tuple[TrainState, Metrics]]:
    """Build the jitted `train_step(state, batch) -> (state, metrics)` (DESIGN §1).

    Metrics are `{name: (sum, count)}` scalars; the host divides once when logging. With
    shardings, the step runs SPMD over their mesh with the state donated.
    """
    loss_fn = make_loss_fn(graphdef, cfg)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(state: TrainState, batch: TrainBatch):
        args = (state.params, state.frozen, state.teacher)
        if cfg.micro_batches == 1:
            return grad_fn(*args, batch)
        norms = global_norms(batch, cfg)
        slices = _micro_slices(batch, cfg.micro_batches)
        first = jax.tree.map(lambda x: x[0], slices)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, *args, first, norms))

        def body(acc, micro):
            return _combine(acc, grad_fn(*args, micro, norms)), None

        acc, _ = jax.lax.scan(body, zeros, slices)
        return acc

    def train_step(state: TrainState, batch: TrainBatch) -> tuple[TrainState, Metrics]:
        (loss, (terms, metrics)), grads = gradients(state, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        teacher = state.teacher
        if cfg.teacher_mode == "ema":
            teacher = ema_update(teacher, params, cfg.ema_rate)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        one = jnp.ones((), jnp.float32)
        metrics = dict(metrics)
        metrics["loss"] = (loss, one)
        metrics.update({f"loss/{k}": (v, one) for k, v in terms.items()})
        metrics["grad_norm"] = (grad_norm, one)
        if schedule is not None:
            metrics["lr"] = (jnp.asarray(schedule(state.step), jnp.float32), one)
        metrics = {
            k: (jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32))
            for k, (s, c) in metrics.items()
        }
        new_state = state.replace(
            step=state.step + 1, params=params, teacher=teacher, opt_state=opt_state, rng=rng
        )
        # The update itself can go non-finite with finite loss and gradients (optim.eps = 0,
        # a NaN b2): the host must see that before it publishes or checkpoints the state.
        metrics.update({k: (v, one) for k, v in state_finite_flags(new_state).items()})
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    # Metrics replicated: every host can read them (only process 0 logs).
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=donate_argnums,
    )
