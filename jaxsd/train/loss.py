"""The train step's loss, one named term per function (METHODS §2–§7):

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

Shapes: B sequences, T input positions, R response tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsd import losses
from jaxsd.train.batch import TrainBatch
from jaxsd.train.head import chunked_head
from jaxsd.train.step_config import StepConfig

__all__ = ["Metrics", "global_norms", "make_loss_fn"]

Metrics = dict[str, tuple[jax.Array, jax.Array]]
# The SSOPD term's normaliser: the number of prompts of the batch, Σ_rows 1/G (METHODS §6).
_PROMPT_MEAN = "prompt-mean"
Inputs = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # tokens, mask, positions, index


class _TokenStats(NamedTuple):
    """What every term reads, per response token."""

    head: dict[str, jax.Array]  # `chunked_head` outputs, each [B, R]
    logp_BxR: jax.Array  # student log-prob of the sampled token (carries the gradient)
    old_logp_BxR: jax.Array  # pi_old: the engine's, or sg(logp_BxR) under rollout_is
    rollout_weight_BxR: jax.Array | None  # truncated trainer-vs-engine IS weight; None = off

    def corrected(self, loss_BxR: jax.Array) -> jax.Array:
        """A term's token losses times the rollout-IS weight (when on)."""
        return loss_BxR if self.rollout_weight_BxR is None else loss_BxR * self.rollout_weight_BxR


def _norm(mask_BxR: jax.Array, mode: str, batch: TrainBatch) -> jax.Array | None:
    """What a term's reduction divides by (tokens, sequences, prompts); None = a constant."""
    if mode == _PROMPT_MEAN:
        return jnp.sum(batch.prompt_share)
    if mode == "token-mean":
        return jnp.sum(mask_BxR)
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return jnp.sum(jnp.sum(mask_BxR, axis=-1) > 0).astype(jnp.float32)
    return None


def _term_masks(batch: TrainBatch, cfg: StepConfig) -> dict[str, tuple[jax.Array, str]]:
    """Mask [B, R] and aggregation mode of every enabled loss term."""
    response_mask_BxR = batch.response_mask
    masks = {}
    if cfg.use_distillation:
        # Only distilled tokens: a teacher row with sd_weight 0 (DRIFT's rhythm-only positives,
        # SC-SDPO's p̂ ∈ {0, 1} questions) must not enter the normaliser (DRIFT Eq. 4; §5).
        distilled_B = batch.sd_mask * (batch.sd_weight != 0)
        masks["distill"] = (response_mask_BxR * distilled_B[:, None], cfg.loss_agg_mode)
    if cfg.use_surrogate:
        masks["pg"] = (response_mask_BxR * (batch.pg_weight != 0)[:, None], cfg.loss_agg_mode)
    if cfg.use_ssopd:
        masks["ssopd"] = (batch.ssopd_mask * (batch.ssopd_weight != 0)[:, None], _PROMPT_MEAN)
    if cfg.kl_coef:
        masks["kl"] = (response_mask_BxR, cfg.loss_agg_mode)
    if cfg.entropy_coef:
        masks["entropy"] = (response_mask_BxR, cfg.loss_agg_mode)
    return masks


def global_norms(batch: TrainBatch, cfg: StepConfig) -> dict[str, jax.Array | None]:
    """Every term's normaliser over the whole batch (micro-batches rescale by them)."""
    return {k: _norm(m, mode, batch) for k, (m, mode) in _term_masks(batch, cfg).items()}


def _reduce(
    loss_BxR: jax.Array, mask_BxR: jax.Array, mode: str, batch: TrainBatch, cfg: StepConfig
) -> jax.Array:
    """One term's scalar: `losses.aggregate`, or SSOPD's Σ_rows mean_t(l) / Q (§6, Eq. 13)."""
    if mode != _PROMPT_MEAN:
        return losses.aggregate(loss_BxR, mask_BxR, mode=mode, norm_constant=cfg.loss_agg_norm)
    row_mean_B = jnp.sum(jnp.where(mask_BxR != 0, loss_BxR * mask_BxR, 0.0), axis=-1) / jnp.maximum(
        jnp.sum(mask_BxR, axis=-1), 1.0
    )
    n_prompts = jnp.sum(batch.prompt_share)
    return jnp.where(n_prompts > 0, jnp.sum(row_mean_B) / jnp.maximum(n_prompts, 1e-9), 0.0)


def _pair(x_BxR: jax.Array, mask_BxR: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over mask, count) of a per-token metric."""
    return jnp.sum(jnp.where(mask_BxR != 0, x_BxR * mask_BxR, 0.0)), jnp.sum(mask_BxR)


def _student_inputs(batch: TrainBatch) -> Inputs:
    return batch.student_tokens, batch.student_mask, batch.student_positions, batch.student_index


def _teacher_inputs(batch: TrainBatch) -> Inputs:
    return batch.teacher_tokens, batch.teacher_mask, batch.teacher_positions, batch.teacher_index


def _hidden_at_response(
    graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, inputs: Inputs
) -> tuple[jax.Array, jax.Array]:
    """Last hidden states at the response rows [B, R, H] and the LM-head weight [H, V]."""
    tokens_BxT, mask_BxT, positions_BxT, index_BxR = inputs
    model = nnx.merge(graphdef, params, frozen)
    # Only the response rows: the last layer then skips the prompt positions.
    h_BxRxH = model.hidden_states(tokens_BxT, mask_BxT, positions_BxT, output_index=index_BxR)
    # Cast like Transformer.logits: an fp32 master weight would promote bf16 hidden
    # states and run the (largest) head matmul in fp32.
    w_HxV = model.lm_head_weight().astype(model.config.compute_jnp_dtype)
    return h_BxRxH, w_HxV


def _response_head(
    graphdef: nnx.GraphDef, cfg: StepConfig, params, frozen, teacher, batch: TrainBatch
) -> dict[str, jax.Array]:
    """Student (and self-teacher) forwards, then the chunked head: `{key: [B, R]}`."""
    student_h_BxRxH, student_w_HxV = _hidden_at_response(
        graphdef, params, frozen, _student_inputs(batch)
    )
    teacher_h_BxRxH = teacher_w_HxV = None
    teacher_params = params if teacher is None else teacher
    if cfg.needs_teacher:
        teacher_h_BxRxH, teacher_w_HxV = _hidden_at_response(
            graphdef, jax.lax.stop_gradient(teacher_params), frozen, _teacher_inputs(batch)
        )
    return chunked_head(
        student_h_BxRxH,
        student_w_HxV,
        batch.response_tokens,
        teacher_h_BxRxH,
        teacher_w_HxV,
        chunk_size=cfg.chunk_size,
        top_k=cfg.top_k,
        topk_block=cfg.topk_block,
        alpha=cfg.alpha,
        add_tail=cfg.add_tail,
        divergence=cfg.use_distillation,
        ssopd_clip=cfg.ssopd_clip if cfg.use_ssopd else None,
    )


def _rollout_correction(
    logp_BxR: jax.Array, batch: TrainBatch, cfg: StepConfig
) -> tuple[jax.Array, jax.Array | None, Metrics]:
    """pi_old, the truncated trainer-vs-engine IS weight (None when off) and its metrics, §2."""
    if not cfg.rollout_is:
        return batch.old_logp, None, {}
    # pi_trainer_old: the params of this forward are the ones the rollouts were sampled
    # with (one optimizer update per batch; micro-batches only accumulate), so its
    # no-grad value is sg(logp) — identical to a separate no-grad forward, at no cost.
    old_logp_BxR = jax.lax.stop_gradient(logp_BxR)
    threshold = cfg.rollout_is_threshold
    weight_BxR = losses.importance_weight(old_logp_BxR, batch.old_logp, is_clip=threshold)
    ratio_BxR = jnp.exp(losses.log_ratio(old_logp_BxR, batch.old_logp))
    response_mask_BxR = batch.response_mask
    metrics: Metrics = {"rollout_is/ratio_mean": _pair(ratio_BxR, response_mask_BxR)}
    ratio_max = jnp.max(jnp.where(response_mask_BxR != 0, ratio_BxR, 0.0))
    metrics["rollout_is/ratio_max"] = (ratio_max, jnp.ones(()))
    metrics["rollout_is/clipped_frac"] = _pair((ratio_BxR > threshold) * 1.0, response_mask_BxR)
    metrics["rollout_is/weight_mean"] = _pair(weight_BxR, response_mask_BxR)
    return old_logp_BxR, weight_BxR, metrics


def _distillation_term(
    stats: _TokenStats, batch: TrainBatch, mask_BxR: jax.Array, cfg: StepConfig
) -> tuple[jax.Array, Metrics]:
    """D_t · IS_t · sd_weight [· e^{-β H^T_t}] per token (§2, SRPO's weight) and metrics."""
    divergence_BxR = stats.head["divergence"]
    is_weight_BxR = losses.importance_weight(
        stats.logp_BxR, stats.old_logp_BxR, is_clip=cfg.is_clip
    )
    loss_BxR = divergence_BxR * is_weight_BxR * batch.sd_weight[:, None]
    metrics: Metrics = {}
    if cfg.sd_entropy_beta is not None:
        entropy_weight_BxR = losses.entropy_token_weights(
            stats.head["teacher_entropy"], beta=cfg.sd_entropy_beta
        )
        loss_BxR = loss_BxR * entropy_weight_BxR
        metrics["distill/entropy_weight"] = _pair(entropy_weight_BxR, mask_BxR)
    loss_BxR = stats.corrected(loss_BxR)
    metrics["distill/divergence"] = _pair(divergence_BxR, mask_BxR)
    metrics["distill/is_weight"] = _pair(is_weight_BxR, mask_BxR)
    if cfg.is_clip is not None:
        ratio_BxR = jnp.exp(losses.log_ratio(stats.logp_BxR, stats.old_logp_BxR))
        metrics["distill/is_clipped_frac"] = _pair((ratio_BxR > cfg.is_clip) * 1.0, mask_BxR)
    metrics["distill/frac_tokens"] = _pair(mask_BxR, batch.response_mask)
    return loss_BxR, metrics


def _student_teacher_kl(stats: _TokenStats, batch: TrainBatch) -> tuple[jax.Array, jax.Array]:
    """Sampled-token estimate of KL(student || teacher) (tokens come from the student)."""
    kl_BxR = stats.logp_BxR - stats.head["teacher_logp"]
    return _pair(kl_BxR, batch.response_mask * batch.sd_mask[:, None])


def _policy_term(
    stats: _TokenStats, batch: TrainBatch, mask_BxR: jax.Array, cfg: StepConfig
) -> tuple[jax.Array, Metrics]:
    """Policy loss · pg_weight [· DRIFT's rhythm gate M^rhy] per token (§4, §7) and metrics."""
    advantage_Bx1 = batch.advantage[:, None]
    pg_loss_BxR, ratio_BxR = _policy_loss(
        stats.logp_BxR, stats.old_logp_BxR, advantage_Bx1, mask_BxR, cfg
    )
    metrics: Metrics = {}
    if cfg.use_rhythm:
        gate_BxR = losses.rhythm_gate(
            jax.lax.stop_gradient(stats.logp_BxR),
            stats.head["teacher_logp"],
            jax.lax.stop_gradient(stats.head["entropy"]),
            stats.head["teacher_entropy"],
            batch.response_mask,
            batch.rhythm_beta,
            **dict(cfg.rhythm),
        )
        pg_loss_BxR = pg_loss_BxR * jax.lax.stop_gradient(gate_BxR)
        metrics["rhythm/gate"] = _pair(gate_BxR, mask_BxR)
    loss_BxR = stats.corrected(pg_loss_BxR * batch.pg_weight[:, None])
    for name, hit_BxR in _clip_fractions(ratio_BxR, advantage_Bx1, cfg).items():
        metrics[f"pg/{name}_frac"] = _pair(hit_BxR, mask_BxR)
    approx_kl_BxR = losses.kl_penalty(stats.logp_BxR, stats.old_logp_BxR)
    metrics["pg/approx_kl_old"] = _pair(approx_kl_BxR, mask_BxR)
    return loss_BxR, metrics


def _policy_loss(
    logp_BxR: jax.Array,
    old_logp_BxR: jax.Array,
    advantage_Bx1: jax.Array,
    mask_BxR: jax.Array,
    cfg: StepConfig,
) -> tuple[jax.Array, jax.Array]:
    """Per-token policy loss of `cfg.policy_loss` and the (no-grad) ratio it clips, §4."""
    clip = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high)
    if cfg.policy_loss == "gspo":
        pg_BxR = losses.gspo_surrogate(logp_BxR, old_logp_BxR, advantage_Bx1, mask_BxR, **clip)
        seq_log_ratio_B = losses.sequence_log_ratio(logp_BxR, old_logp_BxR, mask_BxR)
        ratio_BxR = jnp.exp(seq_log_ratio_B) * jnp.ones_like(logp_BxR)
        return pg_BxR, jax.lax.stop_gradient(ratio_BxR)
    ratio_BxR = jax.lax.stop_gradient(jnp.exp(losses.log_ratio(logp_BxR, old_logp_BxR)))
    if cfg.policy_loss == "cispo":
        return losses.cispo_surrogate(logp_BxR, old_logp_BxR, advantage_Bx1, **clip), ratio_BxR
    pg_BxR = losses.clipped_surrogate(
        logp_BxR, old_logp_BxR, advantage_Bx1, **clip, dual_clip=cfg.dual_clip
    )
    return pg_BxR, ratio_BxR


def _clip_fractions(
    ratio_BxR: jax.Array, advantage_Bx1: jax.Array, cfg: StepConfig
) -> dict[str, jax.Array]:
    """0/1 indicators of the clip each token hits (CISPO: its truncated IS weight, any A)."""
    if cfg.policy_loss == "cispo":
        zero_BxR = jnp.zeros_like(ratio_BxR)
        return {
            "clip_high": (ratio_BxR > 1.0 + cfg.clip_high) * 1.0,
            "clip_low": (ratio_BxR < 1.0 - cfg.clip_low) * 1.0,
            "dual_clip": zero_BxR,
        }
    dual = cfg.dual_clip if cfg.policy_loss == "ppo" else None
    return losses.clip_indicators(
        jnp.log(ratio_BxR),
        jnp.zeros_like(ratio_BxR),
        advantage_Bx1,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=dual,
    )


def _aggregate(
    token_losses: dict[str, jax.Array],
    masks: dict[str, tuple[jax.Array, str]],
    batch: TrainBatch,
    cfg: StepConfig,
    norms: dict[str, jax.Array | None] | None,
) -> dict[str, jax.Array]:
    """Each term's scalar; with the whole batch's `norms`, rescaled to its share of them."""
    terms = {}
    for name, loss_BxR in token_losses.items():
        mask_BxR, mode = masks[name]
        value = _reduce(loss_BxR, mask_BxR, mode, batch, cfg)
        norm = None if norms is None else norms[name]
        if norm is not None:
            # (Prompt counts are sums of 1/G: a fraction, so no floor of 1 there.)
            floor = 1e-9 if mode == _PROMPT_MEAN else 1.0
            value = value * _norm(mask_BxR, mode, batch) / jnp.maximum(norm, floor)
        terms[name] = value
    return terms


def make_loss_fn(graphdef: nnx.GraphDef, cfg: StepConfig) -> Callable[..., Any]:
    """`loss_fn(params, frozen, teacher, batch, global_norms=None) -> (loss, (terms, metrics))`.

    `global_norms` (from the whole batch) rescales a micro-batch's terms; None = whole batch.
    """

    def reference_logp(teacher, frozen, batch: TrainBatch) -> jax.Array:
        """log pi_ref [B, R]: the teacher params on the student's input (§4's KL penalty)."""
        ref_h_BxRxH, ref_w_HxV = _hidden_at_response(
            graphdef, jax.lax.stop_gradient(teacher), frozen, _student_inputs(batch)
        )
        ref = chunked_head(ref_h_BxRxH, ref_w_HxV, batch.response_tokens, chunk_size=cfg.chunk_size)
        return ref["logp"]

    def loss_fn(params, frozen, teacher, batch: TrainBatch, global_norms=None):
        head = _response_head(graphdef, cfg, params, frozen, teacher, batch)
        logp_BxR, entropy_BxR = head["logp"], head["entropy"]
        masks = _term_masks(batch, cfg)
        token_losses: dict[str, jax.Array] = {}
        metrics: Metrics = {"entropy": _pair(entropy_BxR, batch.response_mask)}
        old_logp_BxR, rollout_weight_BxR, rollout_metrics = _rollout_correction(
            logp_BxR, batch, cfg
        )
        metrics.update(rollout_metrics)
        stats = _TokenStats(head, logp_BxR, old_logp_BxR, rollout_weight_BxR)
        if cfg.use_distillation:
            token_losses["distill"], distill_metrics = _distillation_term(
                stats, batch, masks["distill"][0], cfg
            )
            metrics.update(distill_metrics)
        if cfg.needs_teacher:
            metrics["kl/student_teacher"] = _student_teacher_kl(stats, batch)
        if cfg.use_surrogate:
            token_losses["pg"], pg_metrics = _policy_term(stats, batch, masks["pg"][0], cfg)
            metrics.update(pg_metrics)
        if cfg.use_ssopd:
            ssopd_kl_BxR = head["ssopd_kl"]
            token_losses["ssopd"] = stats.corrected(ssopd_kl_BxR * batch.ssopd_weight[:, None])
            metrics["ssopd/kl"] = _pair(ssopd_kl_BxR, masks["ssopd"][0])
        if cfg.kl_coef:
            ref_logp_BxR = reference_logp(teacher, frozen, batch)
            kl_BxR = losses.kl_penalty(logp_BxR, ref_logp_BxR, kind=cfg.kl_kind)
            token_losses["kl"] = cfg.kl_coef * kl_BxR
        if cfg.entropy_coef:
            token_losses["entropy"] = -cfg.entropy_coef * entropy_BxR
        terms = _aggregate(token_losses, masks, batch, cfg, global_norms)
        return sum(terms.values()), (terms, metrics)

    return loss_fn
