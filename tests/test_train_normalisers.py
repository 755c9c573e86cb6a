"""Each loss term's normaliser and correction weight, against a hand computation on a tiny
batch (float64 numpy from the model's own logits): distilled-token mean (DRIFT Eq. 4, SC-SDPO
§5.2), SSOPD's per-prompt mean (Eq. 13), Dr. GRPO's constant, truncated rollout IS, SRPO."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsd.algorithms import LossWeights
from jaxsd.models import ModelConfig, Transformer
from jaxsd.train.batch import TrainSample, build_batch
from jaxsd.train.optimizer import make_optimizer
from jaxsd.train.state import create_train_state
from jaxsd.train.step import StepConfig, make_loss_fn, make_train_step

CFG = ModelConfig(
    vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=8,
)  # fmt: skip
BUCKETS = (16,)


@pytest.fixture(scope="module")
def model():
    tx = make_optimizer(1e-3)
    graphdef, state, _ = create_train_state(
        lambda r: Transformer(CFG, rngs=r), tx, teacher_mode="fixed"
    )
    # A teacher away from the student (as after training), so divergences are not ~0.
    leaves, treedef = jax.tree.flatten(state.teacher)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    teacher = jax.tree.unflatten(
        treedef,
        [
            x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )
    return graphdef, state.replace(teacher=teacher), tx


def _sample(rng, *, teacher: bool, r: int = 5, group_size: int = 1, **kw) -> TrainSample:
    return TrainSample(
        prompt_ids=rng.integers(1, 48, 3).tolist(),
        response_ids=rng.integers(1, 48, r).tolist(),
        old_logp=(-3.9 + 0.3 * rng.normal(size=r)).astype(np.float32),
        teacher_prompt_ids=rng.integers(1, 48, 6).tolist() if teacher else None,
        weights=LossWeights(**kw),
        group_size=group_size,
    )


def _with(sample: TrainSample, **weights) -> TrainSample:
    """`sample` with some of its loss weights changed."""
    return dataclasses.replace(sample, weights=dataclasses.replace(sample.weights, **weights))


def _np_logp(graphdef, params, frozen, b, side: str) -> np.ndarray:
    """float64 log-softmax rows [B, R, V] of the student or teacher input."""
    model = nnx.merge(graphdef, params, frozen)
    logits = model(b[f"{side}_tokens"], b[f"{side}_mask"], b[f"{side}_positions"])
    at = np.take_along_axis(np.asarray(logits, np.float64), b[f"{side}_index"][..., None], 1)
    return (
        at
        - np.log(np.exp(at - at.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - at.max(-1, keepdims=True)
    )


def _terms(graphdef, state, batch, cfg):
    b = jax.tree.map(jnp.asarray, batch)
    _, (terms, metrics) = make_loss_fn(graphdef, cfg)(state.params, state.frozen, state.teacher, b)
    return {k: float(v) for k, v in terms.items()}, metrics


def _token(x: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, tokens[..., None], -1)[..., 0]


def _inputs(graphdef, state, batch):
    b = batch._asdict()
    s = _np_logp(graphdef, state.params, state.frozen, b, "student")
    t = _np_logp(graphdef, state.teacher, state.frozen, b, "teacher")
    return b, s, t


def test_distillation_token_mean_counts_only_distilled_tokens(model):
    """DRIFT Eq. 4 / SC-SDPO §5.2: Σ_{distilled} w D IS / #distilled tokens. Rows with a teacher
    but sd_weight 0 (DRIFT's rhythm-only positives, SC-SDPO's p̂ ∈ {0, 1}) are not counted."""
    graphdef, state, _ = model
    rng = np.random.default_rng(0)
    distilled = [_sample(rng, teacher=True, r=5, sd_weight=1.4), _sample(rng, teacher=True,
                 r=3, sd_weight=0.6)]  # fmt: skip
    rhythm_only = _sample(rng, teacher=True, r=7, sd_weight=0.0, pg_weight=1.0, rhythm_beta=1.0)
    no_teacher = _sample(rng, teacher=False, r=4, sd_weight=0.0)
    cfg = StepConfig(top_k=None, alpha=1.0, teacher_mode="fixed")  # reverse KL, full vocab
    batch = build_batch([*distilled, rhythm_only, no_teacher], pad_id=0, length_buckets=BUCKETS)
    b, s, t = _inputs(graphdef, state, batch)
    kl = (np.exp(s) * (s - t)).sum(-1)  # KL(P || T) per token
    is_w = np.minimum(np.exp(_token(s, b["response_tokens"]) - b["old_logp"]), 2.0)
    w = b["sd_weight"][:, None]
    keep = b["response_mask"] * (b["sd_weight"] != 0)[:, None]
    expected = (kl * is_w * w * keep).sum() / keep.sum()  # 8 distilled tokens, not 15
    assert keep.sum() == 8
    got, _ = _terms(graphdef, state, batch, cfg)
    np.testing.assert_allclose(got["distill"], expected, rtol=1e-5)

    # The SC-SDPO reading: adding zero-weight questions (p̂ = 1, a solution but w_i = 0) does
    # not change the loss, so the unit mean of w over Q⁺ is the effective scale.
    more = [_sample(rng, teacher=True, r=6, sd_weight=0.0) for _ in range(3)]
    batch2 = build_batch([*distilled, *more], pad_id=0, length_buckets=BUCKETS)
    batch1 = build_batch(distilled, pad_id=0, length_buckets=BUCKETS, batch_size=5)
    np.testing.assert_allclose(
        _terms(graphdef, state, batch2, cfg)[0]["distill"],
        _terms(graphdef, state, batch1, cfg)[0]["distill"],
        rtol=1e-6,
    )


def test_ssopd_term_is_averaged_per_prompt_of_the_batch(model):
    """SSOPD Eq. 13: (1/Q) Σ_i ω_i (1/L_i) Σ_{t<L_i} ℓ_t, Q = prompts of the batch (here 3, each
    with G = 2 rollouts; one pair), not divided by the number of pairs."""
    graphdef, state, _ = model
    rng = np.random.default_rng(1)
    samples = [_sample(rng, teacher=False, r=6, group_size=2, advantage=0.5, pg_weight=1.0)
               for _ in range(6)]  # fmt: skip
    samples[3] = dataclasses.replace(
        _with(samples[3], ssopd_weight=0.84, ssopd_len=4),
        teacher_prompt_ids=rng.integers(1, 48, 6).tolist(),
    )
    cfg = StepConfig(
        use_distillation=False, use_surrogate=True, use_ssopd=True, ssopd_clip=0.05, top_k=None,
        teacher_mode="fixed",
    )  # fmt: skip
    batch = build_batch(samples, pad_id=0, length_buckets=BUCKETS)
    b, s, t = _inputs(graphdef, state, batch)
    ell = np.minimum(np.exp(t) * (t - s), 0.05).sum(-1)  # pointwise-clipped forward KL
    expected = 0.84 * ell[3, :4].mean() / 3.0
    got, _ = _terms(graphdef, state, batch, cfg)
    np.testing.assert_allclose(got["ssopd"], expected, rtol=1e-5)


def test_seq_mean_token_sum_norm_divides_by_loss_agg_norm(model):
    graphdef, state, _ = model
    rng = np.random.default_rng(2)
    samples = [_sample(rng, teacher=False, r=r, advantage=a, pg_weight=1.0)
               for r, a in ((5, 0.7), (2, -1.1), (6, 0.3))]  # fmt: skip
    cfg = StepConfig(
        use_distillation=False, use_surrogate=True, teacher_mode="none", top_k=None,
        loss_agg_mode="seq-mean-token-sum-norm", loss_agg_norm=9.0,
    )  # fmt: skip
    batch = build_batch(samples, pad_id=0, length_buckets=BUCKETS)
    b, s, _ = _inputs(graphdef, state, batch)
    rho = np.exp(_token(s, b["response_tokens"]) - b["old_logp"])
    adv = b["advantage"][:, None]
    pg = np.maximum(-adv * rho, -adv * np.clip(rho, 0.8, 1.28))
    pg = np.where(adv < 0, np.minimum(pg, -adv * 3.0), pg)
    expected = (pg * b["response_mask"]).sum() / 9.0
    got, _ = _terms(graphdef, state, batch, cfg)
    np.testing.assert_allclose(got["pg"], expected, rtol=1e-5)


def test_truncated_rollout_is_weights_pg_and_distillation_and_reports_the_mismatch(model):
    """min(π_trainer_old / π_engine, C) on each PG and distillation token; π_trainer_old is the
    trainer's own log-prob before the update, so the PPO ratio and SDPO's IS weight are 1."""
    graphdef, state, _ = model
    rng = np.random.default_rng(3)
    samples = [_sample(rng, teacher=True, r=5, advantage=a, pg_weight=1.0, sd_weight=1.0)
               for a in (0.9, -0.6, 1.3)]  # fmt: skip
    batch = build_batch(samples, pad_id=0, length_buckets=BUCKETS)
    b, s, t = _inputs(graphdef, state, batch)
    logp = _token(s, b["response_tokens"])
    # engine log-probs off by up to ±1 nat: some ratios above C = 1.5
    engine = (logp + rng.uniform(-1.0, 1.0, logp.shape)).astype(np.float32)
    batch = batch._replace(old_logp=engine * b["response_mask"])
    cfg = StepConfig(use_surrogate=True, top_k=None, alpha=1.0, teacher_mode="fixed",
                     rollout_is=True, rollout_is_threshold=1.5)  # fmt: skip
    got, metrics = _terms(graphdef, state, batch, cfg)
    m = b["response_mask"]
    ratio = np.exp(logp - engine)
    w = np.minimum(ratio, 1.5)
    kl = (np.exp(s) * (s - t)).sum(-1)
    np.testing.assert_allclose(got["distill"], (kl * w * m).sum() / m.sum(), rtol=1e-5)
    adv = b["advantage"][:, None]
    np.testing.assert_allclose(got["pg"], (-adv * w * m).sum() / m.sum(), rtol=1e-5)
    mean = metrics["rollout_is/ratio_mean"]
    np.testing.assert_allclose(float(mean[0] / mean[1]), (ratio * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rollout_is/ratio_max"][0]), ratio[m > 0].max(),
                               rtol=1e-5)  # fmt: skip
    frac = metrics["rollout_is/clipped_frac"]
    assert 0 < float(frac[0]) < float(frac[1])
    np.testing.assert_allclose(float(frac[0] / frac[1]), ((ratio > 1.5) * m).sum() / m.sum())
    # Off (the embedded default): the engine's log-probs are π_old, as before.
    off, off_metrics = _terms(graphdef, state, batch, dataclasses.replace(cfg, rollout_is=False))
    assert "rollout_is/ratio_mean" not in off_metrics
    pg_off = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.28))
    pg_off = np.where(adv < 0, np.minimum(pg_off, -adv * 3.0), pg_off)
    np.testing.assert_allclose(off["pg"], (pg_off * m).sum() / m.sum(), rtol=1e-5)


def test_micro_batches_keep_per_prompt_ssopd_rollout_is_and_max_metrics(model):
    """Gradient accumulation over 2 slices gives the whole batch's step: the SSOPD term's
    prompt count and the rollout-IS max are combined over slices, not per slice."""
    graphdef, state, tx = model
    rng = np.random.default_rng(4)
    samples = [_sample(rng, teacher=True, r=int(rng.integers(2, 7)), group_size=2,
                       advantage=float(rng.normal()), pg_weight=1.0, sd_weight=1.0)
               for _ in range(4)]  # fmt: skip
    samples[1] = _with(samples[1], ssopd_weight=0.7, ssopd_len=3)
    cfg = StepConfig(use_surrogate=True, use_ssopd=True, top_k=8, teacher_mode="fixed",
                     rollout_is=True, rollout_is_threshold=1.2)  # fmt: skip
    batch = jax.tree.map(jnp.asarray, build_batch(samples, pad_id=0, length_buckets=BUCKETS))
    batch = batch._replace(old_logp=batch.old_logp + 0.0)
    one = make_train_step(graphdef, tx, cfg, donate=False)(state, batch)
    two = make_train_step(graphdef, tx, dataclasses.replace(cfg, micro_batches=2), donate=False)(
        state, batch
    )
    for key in ("loss", "loss/ssopd", "loss/pg", "loss/distill", "rollout_is/ratio_max"):
        np.testing.assert_allclose(
            np.asarray(two[1][key]), np.asarray(one[1][key]), rtol=1e-5, err_msg=key
        )
    for a, c in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(two[0].params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-6)
