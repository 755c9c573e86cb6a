"""jaxsd.losses: pure loss functions of arrays (METHODS.md §2–§7); imports no other jaxsd room."""

from jaxsd.losses.aggregate import AGG_MODES, aggregate
from jaxsd.losses.divergence import (
    clipped_forward_kl,
    clipped_forward_kl_from_logprobs,
    distillation_divergence,
    entropy_from_logits,
    entropy_from_logprobs,
    gathered_logprobs,
    generalized_jsd_from_logprobs,
    top_k_indices,
    topk_block_width,
    topk_divergence_from_logprobs,
    topk_logprobs_and_tail,
)
from jaxsd.losses.policy import (
    cispo_surrogate,
    clip_indicators,
    clipped_surrogate,
    grpo_advantages,
    gspo_surrogate,
    importance_weight,
    kl_penalty,
    log_ratio,
    sequence_log_ratio,
)
from jaxsd.losses.rhythm import entropy_drop, rhythm_gate
from jaxsd.losses.softmax_stats import SOFTMAX_STATS_RESIDUAL, SoftmaxStats, softmax_stats
from jaxsd.losses.token_weights import entropy_token_weights
from jaxsd.losses.weights import (
    difficulty_weights,
    frontier_weights,
    hard_filter_weights,
    paced_weights,
    pass_rate_weights,
)

__all__ = [
    "AGG_MODES",
    "SOFTMAX_STATS_RESIDUAL",
    "SoftmaxStats",
    "aggregate",
    "cispo_surrogate",
    "clip_indicators",
    "clipped_forward_kl",
    "clipped_forward_kl_from_logprobs",
    "clipped_surrogate",
    "difficulty_weights",
    "distillation_divergence",
    "entropy_drop",
    "entropy_from_logits",
    "entropy_from_logprobs",
    "entropy_token_weights",
    "frontier_weights",
    "gathered_logprobs",
    "generalized_jsd_from_logprobs",
    "grpo_advantages",
    "gspo_surrogate",
    "hard_filter_weights",
    "importance_weight",
    "kl_penalty",
    "log_ratio",
    "paced_weights",
    "pass_rate_weights",
    "rhythm_gate",
    "sequence_log_ratio",
    "softmax_stats",
    "top_k_indices",
    "topk_block_width",
    "topk_divergence_from_logprobs",
    "topk_logprobs_and_tail",
]
