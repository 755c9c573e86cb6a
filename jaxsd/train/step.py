"""The jitted train step: one pure `train_step(state, batch) -> (state, metrics)` for every
algorithm (DESIGN §1). Static switches pick the loss terms; everything per-step is in the batch.

loss = distillation (§2: D_t · IS_t · sd_weight [· e^{-β H^T_t}, SRPO], mask
                     response·sd_mask·[sd_weight≠0]: only distilled tokens are counted)
     + policy loss (§4: PPO / GSPO / CISPO · pg_weight · M^rhy (§7, stop-grad),
                    mask response·[pg_weight≠0])
     + SSOPD (§6: Σ omega · mean_t l_t over its first L tokens, / number of prompts Q)
     + kl_coef · KL(pi || pi_ref) (§4, ref = the teacher params on the student's input)
     - entropy_coef · entropy,
each term reduced with `losses.aggregate(mode=loss_agg_mode)` (SSOPD: per prompt). With
`rollout_is`, the PG, distillation and SSOPD tokens also carry the truncated
trainer-vs-engine weight min(pi_trainer_old / pi_engine, C) (§2).
Micro-batches (gradient accumulation) rescale each term by its share of the global
normaliser, so accumulating gives exactly the gradient of the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxsd import losses
from jaxsd.train.batch import TrainBatch
from jaxsd.train.head import chunked_head
from jaxsd.train.state import TEACHER_MODES, TrainState, ema_update

__all__ = ["StepConfig", "make_loss_fn", "make_train_step", "state_finite_flags"]

Metrics = dict[str, tuple[jax.Array, jax.Array]]
POLICY_LOSSES = ("ppo", "gspo", "cispo")
# Metrics reported as (max, 1) rather than (sum, count): micro-batches combine them by max.
MAX_METRICS = ("rollout_is/ratio_max",)
# The SSOPD term's normaliser: the number of prompts of the batch, Σ_rows 1/G (METHODS §6).
_PROMPT_MEAN = "prompt-mean"
_RHYTHM_KEYS = ("mu", "tau", "b_max", "window", "alpha_anc", "lambda_struct", "m_min", "m_max")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static switches and hyper-parameters of the step (hashable; defaults = METHODS)."""

    use_distillation: bool = True
    use_surrogate: bool = False
    use_ssopd: bool = False
    use_rhythm: bool = False  # DRIFT gate on the surrogate (needs use_surrogate)
    top_k: int | None = 100  # None = full-vocabulary divergence
    # Width of the logit blocks the exact top-k prunes by their maxima (losses.top_k_indices):
    # spares GPUs a radix sort of the whole vocabulary. None = chosen from V and k.
    topk_block: int | None = None
    alpha: float = 0.5  # 0 forward KL, 0.5 JSD, 1 reverse KL
    add_tail: bool = True
    is_clip: float | None = 2.0
    # Truncated IS for the trainer-vs-engine log-prob mismatch (§2): old_logp is the engine's.
    rollout_is: bool = False
    rollout_is_threshold: float = 2.0
    policy_loss: str = "ppo"  # "ppo" (token ratio) | "gspo" (sequence ratio) | "cispo"
    # SRPO's entropy-aware weight e^{-β H^T_t} on distilled tokens; None = off.
    sd_entropy_beta: float | None = None
    loss_agg_mode: str = "token-mean"
    loss_agg_norm: float | None = None  # seq-mean-token-sum-norm's constant (None = T)
    chunk_size: int = 1024  # tokens per LM-head chunk
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    teacher_mode: str = "ema"  # "ema" | "fixed" | "none" (teacher = current student)
    ema_rate: float = 0.05
    ssopd_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    rhythm: tuple[tuple[str, float], ...] = ()  # overrides of losses.rhythm_gate defaults
    micro_batches: int = 1  # gradient accumulation over this many slices of the batch

    def __post_init__(self) -> None:
        if self.loss_agg_mode not in losses.AGG_MODES:
            raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r}; use one of {losses.AGG_MODES}")
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode={self.teacher_mode!r}; use one of {TEACHER_MODES}")
        if not 0.0 < self.ema_rate <= 1.0:
            raise ValueError(f"ema_rate={self.ema_rate} must be in (0, 1]")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches} must be >= 1")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss={self.policy_loss!r}; use one of {POLICY_LOSSES}")
        if self.loss_agg_norm is not None and not self.loss_agg_norm > 0:
            raise ValueError(f"loss_agg_norm={self.loss_agg_norm} must be > 0 (or None = T)")
        if not self.rollout_is_threshold > 0:
            raise ValueError(f"rollout_is_threshold={self.rollout_is_threshold} must be > 0")
        if self.sd_entropy_beta is not None and not self.sd_entropy_beta >= 0:
            raise ValueError(f"sd_entropy_beta={self.sd_entropy_beta} must be >= 0 (or None)")
        if self.topk_block is not None and self.topk_block < 1:
            raise ValueError(f"topk_block={self.topk_block} must be >= 1 (or None)")
        if self.use_rhythm and not self.use_surrogate:
            raise ValueError("use_rhythm gates the surrogate; set use_surrogate=True as well")
        if self.kl_coef and self.teacher_mode == "none":
            raise ValueError("kl_coef > 0 needs a reference: teacher_mode 'fixed' (or 'ema')")
        unknown = {k for k, _ in self.rhythm} - set(_RHYTHM_KEYS)
        if unknown:
            raise ValueError(f"unknown rhythm hparams {sorted(unknown)}; use {_RHYTHM_KEYS}")
        terms = (self.use_distillation, self.use_surrogate, self.use_ssopd)
        if not any(terms) and not self.kl_coef and not self.entropy_coef:
            raise ValueError("no loss term enabled; turn on distillation, surrogate or SSOPD")

    @property
    def needs_teacher(self) -> bool:
        return self.use_distillation or self.use_ssopd or self.use_rhythm


def _norm(mask: jax.Array, mode: str, batch: TrainBatch) -> jax.Array | None:
    """What a term's reduction divides by (tokens, sequences, prompts); None = a constant."""
    if mode == _PROMPT_MEAN:
        return jnp.sum(batch.prompt_share)
    if mode == "token-mean":
        return jnp.sum(mask)
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return jnp.sum(jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
    return None


def _term_masks(batch: TrainBatch, cfg: StepConfig) -> dict[str, tuple[jax.Array, str]]:
    """Mask and aggregation mode of every enabled loss term."""
    rm = batch.response_mask
    masks = {}
    if cfg.use_distillation:
        # Only distilled tokens: a teacher row with sd_weight 0 (DRIFT's rhythm-only positives,
        # SC-SDPO's p̂ ∈ {0, 1} questions) must not enter the normaliser (DRIFT Eq. 4; §5).
        distilled = batch.sd_mask * (batch.sd_weight != 0)
        masks["distill"] = (rm * distilled[:, None], cfg.loss_agg_mode)
    if cfg.use_surrogate:
        masks["pg"] = (rm * (batch.pg_weight != 0)[:, None], cfg.loss_agg_mode)
    if cfg.use_ssopd:
        masks["ssopd"] = (batch.ssopd_mask * (batch.ssopd_weight != 0)[:, None], _PROMPT_MEAN)
    if cfg.kl_coef:
        masks["kl"] = (rm, cfg.loss_agg_mode)
    if cfg.entropy_coef:
        masks["entropy"] = (rm, cfg.loss_agg_mode)
    return masks


def _global_norms(batch: TrainBatch, cfg: StepConfig) -> dict[str, jax.Array | None]:
    return {k: _norm(m, mode, batch) for k, (m, mode) in _term_masks(batch, cfg).items()}


def _reduce(tok: jax.Array, mask: jax.Array, mode: str, batch: TrainBatch, cfg: StepConfig):
    """One term's scalar: `losses.aggregate`, or SSOPD's Σ_rows mean_t(l) / Q (§6, Eq. 13)."""
    if mode != _PROMPT_MEAN:
        return losses.aggregate(tok, mask, mode=mode, norm_constant=cfg.loss_agg_norm)
    row_mean = jnp.sum(jnp.where(mask != 0, tok * mask, 0.0), axis=-1) / jnp.maximum(
        jnp.sum(mask, axis=-1), 1.0
    )
    n_prompts = jnp.sum(batch.prompt_share)
    return jnp.where(n_prompts > 0, jnp.sum(row_mean) / jnp.maximum(n_prompts, 1e-9), 0.0)


def _pair(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over mask, count) of a per-token metric."""
    return jnp.sum(jnp.where(mask != 0, x * mask, 0.0)), jnp.sum(mask)


def make_loss_fn(graphdef: nnx.GraphDef, cfg: StepConfig) -> Callable[..., Any]:
    """`loss_fn(params, frozen, teacher, batch, global_norms=None) -> (loss, (terms, metrics))`.

    `global_norms` (from the whole batch) rescales a micro-batch's terms; None = whole batch.
    """
    rhythm_hparams = dict(cfg.rhythm)

    def hidden_at_response(params, frozen, tokens, mask, positions, index):
        model = nnx.merge(graphdef, params, frozen)
        # Only the response rows: the last layer then skips the prompt positions.
        h_BxRxH = model.hidden_states(tokens, mask, positions, output_index=index)
        # Cast like Transformer.logits: an fp32 master weight would promote bf16 hidden
        # states and run the (largest) head matmul in fp32.
        w_HxV = model.lm_head_weight().astype(model.config.compute_jnp_dtype)
        return h_BxRxH, w_HxV

    def loss_fn(params, frozen, teacher, batch: TrainBatch, global_norms=None):
        b = batch
        s_h, s_w = hidden_at_response(
            params, frozen, b.student_tokens, b.student_mask, b.student_positions, b.student_index
        )
        t_h = t_w = None
        teacher_params = params if teacher is None else teacher
        if cfg.needs_teacher:
            t_h, t_w = hidden_at_response(
                jax.lax.stop_gradient(teacher_params),
                frozen,
                b.teacher_tokens,
                b.teacher_mask,
                b.teacher_positions,
                b.teacher_index,
            )
        head = chunked_head(
            s_h,
            s_w,
            b.response_tokens,
            t_h,
            t_w,
            chunk_size=cfg.chunk_size,
            top_k=cfg.top_k,
            topk_block=cfg.topk_block,
            alpha=cfg.alpha,
            add_tail=cfg.add_tail,
            divergence=cfg.use_distillation,
            ssopd_clip=cfg.ssopd_clip if cfg.use_ssopd else None,
        )
        rm = b.response_mask
        logp, entropy = head["logp"], head["entropy"]
        masks = _term_masks(b, cfg)
        per_token: dict[str, jax.Array] = {}
        metrics: Metrics = {"entropy": _pair(entropy, rm)}

        old_logp, rollout_w = b.old_logp, None
        if cfg.rollout_is:
            # pi_trainer_old: the params of this forward are the ones the rollouts were sampled
            # with (one optimizer update per batch; micro-batches only accumulate), so its
            # no-grad value is sg(logp) — identical to a separate no-grad forward, at no cost.
            old_logp = jax.lax.stop_gradient(logp)
            thr = cfg.rollout_is_threshold
            rollout_w = losses.importance_weight(old_logp, b.old_logp, is_clip=thr)
            raw = jnp.exp(losses.log_ratio(old_logp, b.old_logp))
            metrics["rollout_is/ratio_mean"] = _pair(raw, rm)
            metrics["rollout_is/ratio_max"] = (jnp.max(jnp.where(rm != 0, raw, 0.0)), jnp.ones(()))
            metrics["rollout_is/clipped_frac"] = _pair((raw > thr) * 1.0, rm)
            metrics["rollout_is/weight_mean"] = _pair(rollout_w, rm)

        def corrected(tok: jax.Array) -> jax.Array:
            return tok if rollout_w is None else tok * rollout_w

        if cfg.use_distillation:
            sd_m = masks["distill"][0]
            is_w = losses.importance_weight(logp, old_logp, is_clip=cfg.is_clip)
            tok = head["divergence"] * is_w * b.sd_weight[:, None]
            if cfg.sd_entropy_beta is not None:
                ent_w = losses.entropy_token_weights(
                    head["teacher_entropy"], beta=cfg.sd_entropy_beta
                )
                tok = tok * ent_w
                metrics["distill/entropy_weight"] = _pair(ent_w, sd_m)
            per_token["distill"] = corrected(tok)
            metrics["distill/divergence"] = _pair(head["divergence"], sd_m)
            metrics["distill/is_weight"] = _pair(is_w, sd_m)
            if cfg.is_clip is not None:
                raw = jnp.exp(losses.log_ratio(logp, old_logp))
                metrics["distill/is_clipped_frac"] = _pair((raw > cfg.is_clip) * 1.0, sd_m)
            metrics["distill/frac_tokens"] = _pair(sd_m, rm)
        if cfg.needs_teacher:
            # Sampled-token estimate of KL(student || teacher) (tokens come from the student).
            metrics["kl/student_teacher"] = _pair(
                logp - head["teacher_logp"], rm * b.sd_mask[:, None]
            )
        if cfg.use_surrogate:
            pg_m = masks["pg"][0]
            adv = b.advantage[:, None]
            pg, ratio = _policy_loss(logp, old_logp, adv, pg_m, cfg)
            if cfg.use_rhythm:
                gate = losses.rhythm_gate(
                    jax.lax.stop_gradient(logp),
                    head["teacher_logp"],
                    jax.lax.stop_gradient(entropy),
                    head["teacher_entropy"],
                    rm,
                    b.rhythm_beta,
                    **rhythm_hparams,
                )
                pg = pg * jax.lax.stop_gradient(gate)
                metrics["rhythm/gate"] = _pair(gate, pg_m)
            per_token["pg"] = corrected(pg * b.pg_weight[:, None])
            for name, ind in _clip_fractions(ratio, adv, cfg).items():
                metrics[f"pg/{name}_frac"] = _pair(ind, pg_m)
            metrics["pg/approx_kl_old"] = _pair(losses.kl_penalty(logp, old_logp), pg_m)
        if cfg.use_ssopd:
            per_token["ssopd"] = corrected(head["ssopd_kl"] * b.ssopd_weight[:, None])
            metrics["ssopd/kl"] = _pair(head["ssopd_kl"], masks["ssopd"][0])
        if cfg.kl_coef:
            ref_h, ref_w = hidden_at_response(
                jax.lax.stop_gradient(teacher),
                frozen,
                b.student_tokens,
                b.student_mask,
                b.student_positions,
                b.student_index,
            )
            ref = chunked_head(ref_h, ref_w, b.response_tokens, chunk_size=cfg.chunk_size)
            per_token["kl"] = cfg.kl_coef * losses.kl_penalty(logp, ref["logp"], kind=cfg.kl_kind)
        if cfg.entropy_coef:
            per_token["entropy"] = -cfg.entropy_coef * entropy

        terms = {}
        for name, tok in per_token.items():
            mask, mode = masks[name]
            value = _reduce(tok, mask, mode, b, cfg)
            norm = None if global_norms is None else global_norms[name]
            if norm is not None:
                # (Prompt counts are sums of 1/G: a fraction, so no floor of 1 there.)
                floor = 1e-9 if mode == _PROMPT_MEAN else 1.0
                value = value * _norm(mask, mode, b) / jnp.maximum(norm, floor)
            terms[name] = value
        return sum(terms.values()), (terms, metrics)

    return loss_fn


def _policy_loss(
    logp: jax.Array, old_logp: jax.Array, adv: jax.Array, mask: jax.Array, cfg: StepConfig
) -> tuple[jax.Array, jax.Array]:
    """Per-token policy loss of `cfg.policy_loss` and the (no-grad) ratio it clips, §4."""
    if cfg.policy_loss == "gspo":
        pg = losses.gspo_surrogate(
            logp, old_logp, adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high
        )
        seq = losses.sequence_log_ratio(logp, old_logp, mask)
        return pg, jax.lax.stop_gradient(jnp.exp(seq) * jnp.ones_like(logp))
    ratio = jax.lax.stop_gradient(jnp.exp(losses.log_ratio(logp, old_logp)))
    if cfg.policy_loss == "cispo":
        pg = losses.cispo_surrogate(
            logp, old_logp, adv, clip_low=cfg.clip_low, clip_high=cfg.clip_high
        )
        return pg, ratio
    clip_kw = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
    return losses.clipped_surrogate(logp, old_logp, adv, **clip_kw), ratio


def _clip_fractions(ratio: jax.Array, adv: jax.Array, cfg: StepConfig) -> dict[str, jax.Array]:
    """0/1 indicators of the clip each token hits (CISPO: its truncated IS weight, any A)."""
    if cfg.policy_loss == "cispo":
        zero = jnp.zeros_like(ratio)
        return {
            "clip_high": (ratio > 1.0 + cfg.clip_high) * 1.0,
            "clip_low": (ratio < 1.0 - cfg.clip_low) * 1.0,
            "dual_clip": zero,
        }
    dual = cfg.dual_clip if cfg.policy_loss == "ppo" else None
    return losses.clip_indicators(
        jnp.log(ratio),
        jnp.zeros_like(ratio),
        adv,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=dual,
    )


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
    cfg: StepConfig = StepConfig(),
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
        norms = _global_norms(batch, cfg)
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
