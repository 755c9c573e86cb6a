"""The jitted train step on one device: chunked head vs. a full-logit reference, a pulse,
one compile per length bucket, EMA teacher closed form, optimizer and mesh helpers."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsd import losses
from jaxsd.algorithms import LossWeights
from jaxsd.models import ModelConfig, Transformer
from jaxsd.train.batch import TrainSample, build_batch
from jaxsd.train.head import HEAD_KEYS, chunked_head
from jaxsd.train.mesh import resolve_mesh_shape
from jaxsd.train.optimizer import make_optimizer, make_schedule
from jaxsd.train.state import create_train_state
from jaxsd.train.step import StepConfig, make_loss_fn, make_train_step

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
BUCKETS = (16, 32)


def _samples(seed: int, n: int = 4, resp_len=(4, 12)) -> list[TrainSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = int(rng.integers(*resp_len))
        out.append(
            TrainSample(
                prompt_ids=rng.integers(1, 128, int(rng.integers(2, 6))).tolist(),
                response_ids=rng.integers(1, 128, r).tolist(),
                old_logp=(-5.0 + rng.normal(size=r)).astype(np.float32),
                # one rollout without a teacher row (sd_mask 0)
                teacher_prompt_ids=None if i == 1 else rng.integers(1, 128, 8).tolist(),
                weights=LossWeights(
                    advantage=float(rng.normal()),
                    pg_weight=float([1.0, 0.0, 0.5, 1.0][i % 4]),
                    sd_weight=float(rng.uniform(0.5, 1.5)),
                    ssopd_weight=float([0.0, 0.0, 1.0, 0.7][i % 4]),
                    ssopd_len=int(rng.integers(1, r + 1)),
                    rhythm_beta=float(i % 2),
                ),
                group_size=2,  # rows (0, 1) and (2, 3) are one question each: Q = 2
            )
        )
    return out


def _reference_loss(graphdef, params, frozen, teacher, b, cfg: StepConfig):
    """METHODS §2–§7 on materialised [B, R, V] logits, calling jaxsd.losses directly."""

    def logits_at(p, tokens, mask, positions, index):
        full_BxTxV = nnx.merge(graphdef, p, frozen)(tokens, mask, positions)
        return jnp.take_along_axis(full_BxTxV, index[..., None], axis=1)

    s_BxRxV = logits_at(
        params, b.student_tokens, b.student_mask, b.student_positions, b.student_index
    )
    t_BxRxV = logits_at(
        jax.lax.stop_gradient(teacher),
        b.teacher_tokens,
        b.teacher_mask,
        b.teacher_positions,
        b.teacher_index,
    )
    ref_BxRxV = logits_at(
        jax.lax.stop_gradient(teacher),
        b.student_tokens,
        b.student_mask,
        b.student_positions,
        b.student_index,
    )

    def token_logp(x):
        logp = jax.nn.log_softmax(x, axis=-1)
        return jnp.take_along_axis(logp, b.response_tokens[..., None], axis=-1)[..., 0]

    logp, t_logp = token_logp(s_BxRxV), token_logp(t_BxRxV)
    ent, t_ent = losses.entropy_from_logits(s_BxRxV), losses.entropy_from_logits(t_BxRxV)
    rm, mode, norm = b.response_mask, cfg.loss_agg_mode, cfg.loss_agg_norm
    old, rollout_w = b.old_logp, jnp.ones_like(logp)
    if cfg.rollout_is:
        # pi_trainer_old from a separate no-grad forward of the same params.
        no_grad = jax.lax.stop_gradient(params)
        old = token_logp(
            logits_at(
                no_grad, b.student_tokens, b.student_mask, b.student_positions, b.student_index
            )
        )
        rollout_w = jnp.minimum(jnp.exp(old - b.old_logp), cfg.rollout_is_threshold)
    total = 0.0
    if cfg.use_distillation:
        d = losses.distillation_divergence(
            s_BxRxV, t_BxRxV, top_k=cfg.top_k, alpha=cfg.alpha, add_tail=cfg.add_tail
        )
        w = losses.importance_weight(logp, old, is_clip=cfg.is_clip) * rollout_w
        if cfg.sd_entropy_beta is not None:
            w = w * jnp.exp(-cfg.sd_entropy_beta * t_ent)
        sd_m = rm * (b.sd_mask * (b.sd_weight != 0))[:, None]
        total += losses.aggregate(d * w * b.sd_weight[:, None], sd_m, mode=mode, norm_constant=norm)
    if cfg.use_surrogate:
        adv = b.advantage[:, None]
        pg_m = rm * (b.pg_weight != 0)[:, None]
        if cfg.policy_loss == "gspo":
            pg = losses.gspo_surrogate(
                logp, old, adv, pg_m, clip_low=cfg.clip_low, clip_high=cfg.clip_high
            )
        elif cfg.policy_loss == "cispo":
            pg = losses.cispo_surrogate(
                logp, old, adv, clip_low=cfg.clip_low, clip_high=cfg.clip_high
            )
        else:
            pg = losses.clipped_surrogate(logp, old, adv)
        if cfg.use_rhythm:
            pg = pg * losses.rhythm_gate(logp, t_logp, ent, t_ent, rm, b.rhythm_beta)
        total += losses.aggregate(
            pg * b.pg_weight[:, None] * rollout_w, pg_m, mode=mode, norm_constant=norm
        )
    if cfg.use_ssopd:
        kl = losses.clipped_forward_kl(s_BxRxV, t_BxRxV, clip=cfg.ssopd_clip) * rollout_w
        ssopd_m = b.ssopd_mask * (b.ssopd_weight != 0)[:, None]
        row_means = jnp.sum(kl * b.ssopd_weight[:, None] * ssopd_m, -1) / jnp.maximum(
            jnp.sum(ssopd_m, -1), 1.0
        )
        total += jnp.sum(row_means) / jnp.sum(b.prompt_share)  # per prompt (SSOPD Eq. 13)
    if cfg.kl_coef:
        total += cfg.kl_coef * losses.aggregate(
            losses.kl_penalty(logp, token_logp(ref_BxRxV), kind=cfg.kl_kind),
            rm,
            mode=mode,
            norm_constant=norm,
        )
    if cfg.entropy_coef:
        total -= cfg.entropy_coef * losses.aggregate(ent, rm, mode=mode, norm_constant=norm)
    return total


def _perturbed(tree, seed: int, scale: float = 0.05):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            x + scale * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )


ALL_TERMS = StepConfig(
    use_distillation=True,
    use_surrogate=True,
    use_ssopd=True,
    use_rhythm=True,
    top_k=16,
    alpha=0.5,
    add_tail=True,
    chunk_size=6,
    kl_coef=0.05,
    entropy_coef=0.01,
    teacher_mode="fixed",
)


NEW_SWITCHES = [
    ALL_TERMS,
    # GSPO + rollout IS + SRPO's entropy weights + Dr. GRPO's constant normaliser.
    dataclasses.replace(
        ALL_TERMS,
        policy_loss="gspo",
        rollout_is=True,
        rollout_is_threshold=1.5,
        sd_entropy_beta=0.7,
        loss_agg_mode="seq-mean-token-sum-norm",
        loss_agg_norm=7.0,
    ),
    dataclasses.replace(ALL_TERMS, policy_loss="cispo", clip_low=1.0),
]


@pytest.mark.parametrize("cfg", NEW_SWITCHES, ids=["ppo", "gspo+is+entropy+norm", "cispo"])
def test_chunked_loss_and_grads_equal_full_logit_reference(cfg):
    tx = make_optimizer(1e-3)
    graphdef, state, _ = create_train_state(
        lambda r: Transformer(CFG, rngs=r), tx, teacher_mode=cfg.teacher_mode
    )
    # A teacher that differs from the student, as after some training.
    teacher = _perturbed(state.teacher, seed=1)
    batch = jax.tree.map(jnp.asarray, build_batch(_samples(0), pad_id=0, length_buckets=BUCKETS))
    loss_fn = make_loss_fn(graphdef, cfg)
    chunked = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, state.frozen, teacher, batch)[0]))
    ref = jax.jit(
        jax.value_and_grad(
            lambda p: _reference_loss(graphdef, p, state.frozen, teacher, batch, cfg)
        )
    )
    loss, grads = chunked(state.params)
    ref_loss, ref_grads = ref(state.params)
    assert abs(float(ref_loss)) > 1e-3  # a loss with content, not an all-masked zero
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)
    assert float(_global_norm(ref_grads)) > 1e-4


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("ssopd_clip", [0.5, None])
@pytest.mark.parametrize(
    "top_k,alpha,add_tail,chunk",
    [(16, 0.5, True, 5), (16, 1.0, False, 7), (16, 0.0, True, 64), (None, 0.3, True, 3)],
)
def test_chunked_head_equals_full_logits(top_k, alpha, add_tail, chunk, ssopd_clip):
    """Head outputs and their gradients vs. losses.* on materialised [B, R, V] logits; every
    output weighted, the entropies included. Without SSOPD and with a top-k the head takes
    `losses.softmax_stats` (two passes, its own gradient), else whole log-softmax rows."""
    b, r, h, v = 3, 10, 16, 128
    ks = jax.random.split(jax.random.key(7), 5)
    s_h, t_h = jax.random.normal(ks[0], (b, r, h)), jax.random.normal(ks[1], (b, r, h))
    s_w, t_w = jax.random.normal(ks[2], (h, v)), jax.random.normal(ks[3], (h, v))
    tok = jax.random.randint(ks[4], (b, r), 0, v)
    weights = {k: float(i + 1) for i, k in enumerate(HEAD_KEYS)}

    def chunked(s_h, s_w):
        out = chunked_head(
            s_h,
            s_w,
            tok,
            t_h,
            t_w,
            chunk_size=chunk,
            top_k=top_k,
            alpha=alpha,
            add_tail=add_tail,
            ssopd_clip=ssopd_clip,
        )
        return sum(weights[k] * jnp.sum(x) for k, x in out.items()), out

    def full(s_h, s_w):
        s_logits, t_logits = s_h @ s_w, t_h @ t_w
        s_logp = jnp.take_along_axis(jax.nn.log_softmax(s_logits), tok[..., None], -1)[..., 0]
        t_logp = jnp.take_along_axis(jax.nn.log_softmax(t_logits), tok[..., None], -1)[..., 0]
        out = {
            "logp": s_logp,
            "entropy": losses.entropy_from_logits(s_logits),
            "teacher_logp": t_logp,
            "teacher_entropy": losses.entropy_from_logits(t_logits),
            "divergence": losses.distillation_divergence(
                s_logits, t_logits, top_k=top_k, alpha=alpha, add_tail=add_tail
            ),
        }
        if ssopd_clip is not None:
            out["ssopd_kl"] = losses.clipped_forward_kl(s_logits, t_logits, clip=ssopd_clip)
        return sum(weights[k] * jnp.sum(x) for k, x in out.items()), out

    (val, out), grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(s_h, s_w)
    (ref_val, ref_out), ref_grads = jax.jit(jax.value_and_grad(full, (0, 1), has_aux=True))(
        s_h, s_w
    )
    assert set(out) == set(HEAD_KEYS) - ({"ssopd_kl"} if ssopd_clip is None else set())
    chex.assert_shape(list(out.values()), (b, r))
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-5)


PULSE_STEPS = 30
EMA_RATE = 0.05


@pytest.fixture(scope="module")
def pulse_run():
    """SDPO on one fixed batch for 30 steps; params, teacher, losses, compile counts."""
    tx = make_optimizer(1e-2, clip_norm=1.0)
    cfg = StepConfig(top_k=16, chunk_size=16, teacher_mode="ema", ema_rate=EMA_RATE)
    graphdef, state, _ = create_train_state(lambda r: Transformer(CFG, rngs=r), tx, seed=3)
    samples = _samples(5)
    model = nnx.merge(graphdef, state.params, state.frozen)
    # On-policy old log-probs (ratio 1 at step 0), from the full forward of the initial model.
    on_policy = []
    for s in samples:
        ids = jnp.asarray([list(s.prompt_ids) + list(s.response_ids)])
        logp = jax.nn.log_softmax(model(ids)[0], axis=-1)
        pos = len(s.prompt_ids) - 1 + np.arange(len(s.response_ids))
        on_policy.append(
            dataclasses.replace(
                s,
                old_logp=np.asarray(logp[pos, np.asarray(s.response_ids)]),
                weights=dataclasses.replace(s.weights, sd_weight=1.0),
            )
        )
    batch = build_batch(on_policy, pad_id=0, length_buckets=BUCKETS)
    step = make_train_step(graphdef, tx, cfg)

    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        params = [jax.device_get(state.params)]
        teachers = [jax.device_get(state.teacher)]
        metrics = []
        for _ in range(PULSE_STEPS):
            state, m = step(state, batch)
            params.append(jax.device_get(state.params))
            teachers.append(jax.device_get(state.teacher))
            metrics.append(jax.device_get(m))
        n_one_bucket = compiles.count("/jax/core/compile/backend_compile_duration")
        # A longer batch lands in the next bucket: exactly one more compile, then none.
        long_batch = build_batch(_samples(6, resp_len=(14, 20)), pad_id=0, length_buckets=BUCKETS)
        assert long_batch.student_tokens.shape[1] == 32
        for _ in range(2):
            state, _ = step(state, long_batch)
        jax.block_until_ready(state)
        n_two_buckets = compiles.count("/jax/core/compile/backend_compile_duration")
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return dict(
        params=params,
        teachers=teachers,
        metrics=metrics,
        n_one_bucket=n_one_bucket,
        n_two_buckets=n_two_buckets,
    )


def _mean(m, key):
    s, c = m[key]
    return float(s) / float(c)


def _dot_eqns(jaxpr) -> list:
    """Every dot_general of a jaxpr, nested calls included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):  # cond branches
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _dot_eqns(inner)
    return out


def test_head_matmul_backward_runs_in_the_compute_dtype():
    """bf16 head: both backward matmuls take bf16 operands (fp32 accumulation), and the
    gradients are those of the fp32 cotangent rounded to bf16 first (mixed precision)."""
    from jaxsd.train.head import _logits

    kh, kw, kc = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (2, 3, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (16, 40)).astype(jnp.bfloat16)
    c = jax.random.normal(kc, (2, 3, 40))  # fp32 cotangent of the fp32 logits

    def f(h, w):
        return jnp.sum(_logits(h, w) * c)

    dh, dw = jax.grad(f, (0, 1))(h, w)
    chex.assert_type([dh, dw], jnp.bfloat16)
    g = np.asarray(c.astype(jnp.bfloat16), np.float32)
    h32, w32 = np.asarray(h, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(
        np.asarray(dh, np.float32), np.einsum("bcv,hv->bch", g, w32), rtol=1e-2, atol=1e-2
    )
    np.testing.assert_allclose(
        np.asarray(dw, np.float32), np.einsum("bch,bcv->hv", h32, g), rtol=1e-2, atol=1e-2
    )
    dots = _dot_eqns(jax.make_jaxpr(jax.grad(f, (0, 1)))(h, w).jaxpr)
    assert len(dots) >= 3  # forward, dh, dw
    for eqn in dots:
        assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_weight_gradient_equals_closed_form_on_every_platform(dtype):
    """dW = hᵀ g in fp32: XLA:CPU gets h transposed into its own buffer first (a plain GEMM,
    2x faster there), other backends the folded form; the values are the same closed form."""
    from jaxsd.train.head import _weight_grad

    kh, kg = jax.random.split(jax.random.key(3))
    h = jax.random.normal(kh, (24, 16)).astype(dtype)
    g = jax.random.normal(kg, (24, 40)).astype(dtype)
    dw = jax.jit(_weight_grad)(h, g)
    chex.assert_shape(dw, (16, 40))
    chex.assert_type(dw, jnp.float32)
    h64, g64 = np.asarray(h, np.float64), np.asarray(g, np.float64)
    np.testing.assert_allclose(np.asarray(dw), h64.T @ g64, rtol=1e-5, atol=1e-4)
    traced = jax.jit(_weight_grad).trace(h, g)
    lowered = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda", "tpu")}
    assert "optimization_barrier" in lowered["cpu"]
    assert "optimization_barrier" not in lowered["cuda"]
    assert "optimization_barrier" not in lowered["tpu"]


def test_pruned_top_k_step_equals_the_plain_step():
    """StepConfig.topk_block changes how the top-k is found, not the loss or its gradient
    (vocab 128, k 16: width 4 prunes 32 blocks to 16, width 128 is one lax.top_k)."""
    tx = make_optimizer(1e-3)
    graphdef, state, _ = create_train_state(
        lambda r: Transformer(CFG, rngs=r), tx, teacher_mode="fixed"
    )
    teacher = _perturbed(state.teacher, seed=1)
    batch = jax.tree.map(jnp.asarray, build_batch(_samples(0), pad_id=0, length_buckets=BUCKETS))

    def value_and_grad(cfg):
        loss_fn = make_loss_fn(graphdef, cfg)
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, state.frozen, teacher, batch)[0]))(
            state.params
        )

    plain = value_and_grad(dataclasses.replace(ALL_TERMS, topk_block=CFG.vocab_size))
    pruned = value_and_grad(dataclasses.replace(ALL_TERMS, topk_block=4))
    assert abs(float(plain[0])) > 1e-3
    chex.assert_trees_all_close(pruned, plain, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="topk_block"):
        dataclasses.replace(ALL_TERMS, topk_block=0)


def test_random_train_state_is_the_model_built_with_the_same_seed():
    """create_train_state without a mesh (op-by-op init): params bit-equal to the model that
    nnx.Rngs(seed) builds, the EMA teacher a copy of them, AdamW moments zero."""
    tx = make_optimizer(1e-3)
    _, state, shardings = create_train_state(lambda r: Transformer(CFG, rngs=r), tx, seed=5)
    assert shardings is None
    model_params = nnx.state(Transformer(CFG, rngs=nnx.Rngs(5)), nnx.Param)
    chex.assert_trees_all_equal(
        jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, model_params)
    )
    chex.assert_trees_all_equal(state.teacher, state.params)
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(state.params))
    assert all(not np.asarray(m).any() for m in moments)


def test_pulse_loss_falls_on_a_fixed_batch(pulse_run):
    ms = pulse_run["metrics"]
    first, last = ms[0], ms[-1]
    # The student closes most of the gap to its (slowly following) teacher; a sign error in
    # the divergence or its gradient would make it grow instead.
    assert _mean(last, "loss") < 0.2 * _mean(first, "loss")
    assert _mean(last, "distill/divergence") < 0.2 * _mean(first, "distill/divergence")
    assert all(np.isfinite(_mean(m, "loss")) for m in ms)
    # on-policy old log-probs: the first step's IS weights are exactly 1
    np.testing.assert_allclose(_mean(first, "distill/is_weight"), 1.0, atol=1e-4)


def test_step_compiles_once_per_length_bucket(pulse_run):
    assert pulse_run["n_one_bucket"] == 1
    assert pulse_run["n_two_buckets"] == 2


def test_ema_teacher_equals_closed_form(pulse_run):
    """theta_T^n = (1-l)^n theta_0 + sum_i l (1-l)^(n-i) theta_i, METHODS §1."""
    params, teachers = pulse_run["params"], pulse_run["teachers"]
    lam, n = EMA_RATE, PULSE_STEPS
    flat = [
        np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(p)]) for p in params
    ]
    closed = (1 - lam) ** n * flat[0]
    for i in range(1, n + 1):
        closed = closed + lam * (1 - lam) ** (n - i) * flat[i]
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(teachers[n])])
    np.testing.assert_allclose(got, closed, atol=1e-6, rtol=1e-5)
    assert np.max(np.abs(flat[n] - flat[0])) > 1e-3  # the student did move


def test_schedule_warmup_then_constant_and_cosine():
    lr, w, total = 1e-3, 10, 110
    const = make_schedule(lr, warmup_steps=w)
    cos = make_schedule(lr, warmup_steps=w, kind="cosine", total_steps=total)
    for s in (0, 3, 10, 50, 200):
        warm = lr * min(s, w) / w
        np.testing.assert_allclose(float(const(s)), warm if s < w else lr, rtol=1e-6)
        frac = min(max(s - w, 0), total - w) / (total - w)
        want = warm if s < w else lr * 0.5 * (1 + np.cos(np.pi * frac))
        np.testing.assert_allclose(float(cos(s)), want, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule(lr, kind="cosine")


def test_optimizer_is_clipped_adamw():
    """One update = AdamW (wd 0.01) on the gradient rescaled to global norm 1."""
    lr, wd, eps = 1e-2, 0.01, 1e-8
    tx = make_optimizer(lr, weight_decay=wd, eps=eps, clip_norm=1.0)
    p = {"a": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([[0.5]])}
    g = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([[12.0]])}  # global norm 13
    updates, _ = tx.update(g, tx.init(p), p)
    for k in p:
        gc = np.asarray(g[k]) / 13.0
        m_hat, v_hat = gc, gc**2  # bias-corrected first moments at step 1
        want = -lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * np.asarray(p[k]))
        np.testing.assert_allclose(np.asarray(updates[k]), want, rtol=1e-5)


def test_mesh_shape_fill_and_errors():
    assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert resolve_mesh_shape((2, 4, 1), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="cannot fill"):
        resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="uses 4 devices"):
        resolve_mesh_shape((2, 2, 1), 8)


def test_step_config_rejects_inconsistent_switches():
    with pytest.raises(ValueError, match="use_surrogate"):
        StepConfig(use_rhythm=True)
    with pytest.raises(ValueError, match="reference"):
        StepConfig(kl_coef=0.1, teacher_mode="none")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        StepConfig(loss_agg_mode="mean")


def test_lora_step_trains_only_the_adapters_with_closed_form_gradients():
    """LoRA (trainable = nnx.LoRAParam): with B = 0 at init, dL/dB = scale · Aᵀ dL/dW and
    dL/dA = 0 for every adapted projection (W = the frozen base kernel); a step then moves
    the adapters only, and the EMA teacher follows the adapters."""
    from jaxsd.models.lora import LoraConfig

    lora = LoraConfig(rank=4, alpha=8.0)
    cfg = dataclasses.replace(ALL_TERMS, teacher_mode="ema")
    model_fn = lambda r: Transformer(CFG, rngs=r, lora=lora)  # noqa: E731
    batch = jax.tree.map(jnp.asarray, build_batch(_samples(0), pad_id=0, length_buckets=BUCKETS))

    # Closed form, from one gradient over every Param (adapters included).
    tx = make_optimizer(1e-3)
    graphdef, full, _ = create_train_state(model_fn, tx, teacher_mode="fixed")
    loss_fn = make_loss_fn(graphdef, cfg)
    # The teacher reads other contexts than the student, so every term has a gradient.
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, full.frozen, full.teacher, batch)[0]))(
        full.params
    )
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(grads)}
    params = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(full.params)}
    adapted = [k[: -len("/lora_b")] for k in flat if k.endswith("/lora_b")]
    assert len(adapted) == CFG.num_layers * 7  # q k v o gate up down
    for name in adapted:
        a = np.asarray(params[f"{name}/lora_a"][...])
        d_kernel = np.asarray(flat[f"{name}/kernel"][...])
        assert np.abs(d_kernel).max() > 1e-6, name  # a gradient with content
        np.testing.assert_allclose(
            np.asarray(flat[f"{name}/lora_b"][...]), lora.scale * a.T @ d_kernel,
            rtol=1e-4, atol=1e-6,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(flat[f"{name}/lora_a"][...]), 0.0)

    # A LoRA train step: base weights bit-identical, adapters (B) moved, teacher = EMA of them.
    graphdef, state, _ = create_train_state(
        model_fn, tx, teacher_mode="ema", trainable=nnx.LoRAParam
    )
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(state.params)), (
        "only adapters are trainable"
    )
    before = state
    # A lighter step (distillation only) than the gradient check's: compile time.
    step_cfg = StepConfig(top_k=16, chunk_size=6, teacher_mode="ema")
    step = make_train_step(graphdef, tx, step_cfg, donate=False)
    state, metrics = step(state, batch)
    chex.assert_trees_all_equal(state.frozen, before.frozen)
    moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), state.params, before.params)
    assert max(jax.tree.leaves(moved)) > 0
    expected_teacher = jax.tree.map(
        lambda t, p: (1 - step_cfg.ema_rate) * t + step_cfg.ema_rate * p,
        before.teacher,
        state.params,
    )
    chex.assert_trees_all_close(state.teacher, expected_teacher, atol=1e-7)
    assert np.isfinite(float(metrics["loss"][0]))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_config_micro_batches_give_the_same_update(mode):
    """`optim.micro_batches` reaches the step; 4 micro-batches and 1 give the same update.

    Plain SGD with lr 1 makes the update the gradient itself (Adam would turn 1-ulp
    differences of near-zero entries into lr-sized steps). Tolerances: every entry of the
    update within 1e-4 × the largest update entry; (sum, count) metrics and the grad norm
    within 1e-5 relative (fp32 sums in a different order).
    """
    from configs import sdpo
    from jaxsd.train.settings import step_config

    cfg = sdpo.get_config("smoke")
    cfg.optim.micro_batches = 4
    assert step_config(cfg, {}).micro_batches == 4
    tx = optax.sgd(1.0)
    graphdef, state, _ = create_train_state(
        lambda r: Transformer(CFG, rngs=r), tx, teacher_mode="fixed"
    )
    state = state.replace(teacher=_perturbed(state.teacher, seed=2))
    params0 = jax.device_get(state.params)
    batch = build_batch(_samples(7, n=8), pad_id=0, length_buckets=BUCKETS)
    updates, metrics = {}, {}
    for n in (1, 4):
        step_cfg = dataclasses.replace(ALL_TERMS, loss_agg_mode=mode, micro_batches=n)
        new, m = make_train_step(graphdef, tx, step_cfg, donate=False)(state, batch)
        updates[n] = jax.tree.map(np.subtract, jax.device_get(new.params), params0)
        metrics[n] = jax.device_get(m)
    scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(updates[1]))
    assert scale > 1e-3  # a real update, not a no-op
    chex.assert_trees_all_close(updates[4], updates[1], atol=1e-4 * scale, rtol=0)
    chex.assert_trees_all_close(metrics[4], metrics[1], atol=0, rtol=1e-5)
    with pytest.raises(ValueError, match="micro_batches=3"):
        make_train_step(graphdef, tx, dataclasses.replace(ALL_TERMS, micro_batches=3))(state, batch)
