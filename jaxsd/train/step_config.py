"""`StepConfig`: the static switches and hyper-parameters the train step is built from
(DESIGN §1: which loss terms are on, chunk size, aggregation); hashable, defaults = METHODS."""

from __future__ import annotations

import dataclasses

from jaxsd import losses
from jaxsd.train.state import TEACHER_MODES

__all__ = ["POLICY_LOSSES", "StepConfig"]

POLICY_LOSSES = ("ppo", "gspo", "cispo")
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
