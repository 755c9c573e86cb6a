"""The SDPO top-k + tail JSD written the straightforward PyTorch way (the SDPO/verl code's recipe).

Torch-only, so both jaxsd's .venv (bench/distill_head.py) and the throwaway `trl` venv
(bench/peers/trl_step.py) import it. Recipe: full-vocabulary log-softmax of student and
teacher, gather at the student's top-k, tail = log(1 - sum top-k) with the sum clamped below 1
(METHODS §2 notes this loses precision once the tail is < ~1e-6; our JAX code uses the exact
complement logsumexp), then the generalised JSD on K ∪ {tail}.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    lse = torch.clamp(torch.logsumexp(topk_logp, -1, keepdim=True), max=-1e-7)
    return torch.cat([topk_logp, torch.log(-torch.expm1(lse))], -1)


def sdpo_topk_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int = 100,
    alpha: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """Per-token top-k + tail generalised JSD, METHODS §2, SDPO code's recipe; [..., V] -> [...]."""
    s_logp = F.log_softmax(student_logits.float(), -1)
    t_logp = F.log_softmax(teacher_logits.detach().float(), -1)
    idx = student_logits.detach().topk(top_k, -1).indices
    p = _with_tail(s_logp.gather(-1, idx))
    t = _with_tail(t_logp.gather(-1, idx))
    m = torch.logsumexp(torch.stack([p + math.log1p(-alpha), t + math.log(alpha)]), 0)
    kl_pm = F.kl_div(m, p, reduction="none", log_target=True).sum(-1)
    kl_tm = F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
    return (1 - alpha) * kl_pm + alpha * kl_tm
