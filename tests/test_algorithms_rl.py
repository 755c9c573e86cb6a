"""GRPO, SRPO and SSOPD plans on hand-built groups vs METHODS §4, §5, §6 and §8."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsd.algorithms import Group, HostState, LossWeights, Rollout, get_algorithm

PROMPT = [{"role": "user", "content": "Q"}]
TAIL = "\n\nCorrectly solve the original question."


def roll(q, response, reward, *, length=None, mean_logp=-1.0):
    n = len(response) if length is None else length
    return Rollout(q, PROMPT, response, list(range(n)), np.full(n, mean_logp), reward)


def ref_advantages(rewards, normalize=True, eps=1e-6):
    """(r - mean) / (unbiased std + eps) written with numpy (METHODS §4, verl's torch.std)."""
    r = np.asarray(rewards, dtype=np.float64)
    centred = r - r.mean()
    return centred / (r.std(ddof=1) + eps) if normalize else centred


def group(q, rewards):
    return Group(q, tuple(roll(q, f"{q}-{j}", r) for j, r in enumerate(rewards)))


@pytest.mark.parametrize("normalize", [True, False])
def test_grpo_advantage_over_each_group(normalize):
    groups = [group("a", [1, 0, 0, 1]), group("b", [0.2, 0.9, 0.5, 0.5]), group("c", [0] * 4)]
    plans, _, _ = get_algorithm("grpo", normalize=normalize).plan(groups, HostState(), epoch=0)
    want = np.concatenate([ref_advantages(g.rewards, normalize) for g in groups])
    np.testing.assert_allclose([p.weights.advantage for p in plans], want, rtol=1e-5, atol=1e-6)
    assert all(p.weights.pg_weight == 1.0 and p.weights.sd_weight == 0.0 for p in plans)
    assert all(p.teacher_messages is None and p.route == "pg" for p in plans)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=8))
def test_grpo_advantages_sum_to_zero_and_match_numpy(rewards):
    plans, _, _ = get_algorithm("grpo").plan([group("h", rewards)], HostState(), epoch=0)
    adv = np.asarray([p.weights.advantage for p in plans])
    np.testing.assert_allclose(adv, ref_advantages(rewards), rtol=1e-4, atol=1e-4)
    assert abs(adv.sum()) < 1e-3 * len(rewards)


def test_srpo_routes_wrong_rollouts_with_a_correct_sibling_to_sdpo():
    groups = [group("m", [0, 1, 0, 1]), group("w", [0, 0]), group("c", [1, 1])]
    plans, _, metrics = get_algorithm("srpo").plan(groups, HostState(), epoch=0)
    assert [p.route for p in plans] == ["sd", "pg", "sd", "pg", "pg", "pg", "pg", "pg"]
    adv_m = ref_advantages([0, 1, 0, 1])
    for j in (1, 3):  # correct rollouts: GRPO with the advantage over the whole group
        assert plans[j].weights.advantage == pytest.approx(adv_m[j], rel=1e-5)
        assert plans[j].teacher_messages is None and plans[j].weights.pg_weight == 1.0
    for j in (0, 2):
        assert plans[j].weights.sd_weight == 1.0 and plans[j].weights.pg_weight == 0.0
        want = "Q\nCorrect solution:\n\nm-1\n" + TAIL
        assert plans[j].teacher_messages == [{"role": "user", "content": want}]
    assert [p.weights.advantage for p in plans[4:]] == [0.0] * 4
    assert metrics["route/sd"] == 0.25 and metrics["route/pg"] == 0.75


def ssopd_group():
    """Correct: lengths 7, 3, 9, 3 (mean logp -1, -2, -0.5, -3); wrong: 4, 300, 300, 2."""
    q = "s"
    specs = [
        (1.0, 7, -1.0), (0.0, 4, -0.2), (1.0, 3, -2.0), (0.0, 300, -1.5),
        (1.0, 9, -0.5), (0.0, 300, -0.1), (1.0, 3, -3.0), (0.0, 2, -4.0),
    ]  # fmt: skip
    return Group(
        q, tuple(roll(q, f"y{j}", r, length=n, mean_logp=lp) for j, (r, n, lp) in enumerate(specs))
    )


def ref_pair(g, correct_sel, wrong_sel):
    """Selector by explicit sort keys; ties -> earliest index (independent of the code)."""
    c = [j for j, r in enumerate(g.rollouts) if r.reward >= 0.5]
    w = [j for j, r in enumerate(g.rollouts) if r.reward < 0.5]
    size = {j: len(g.rollouts[j].response_ids) for j in range(len(g))}
    logp = {j: float(np.mean(g.rollouts[j].logprobs)) for j in range(len(g))}
    key = {
        "shortest": lambda j: (size[j], j),
        "longest": lambda j: (-size[j], j),
        "max-logp": lambda j: (-logp[j], j),
        "min-logp": lambda j: (logp[j], j),
    }
    return sorted(c, key=key[correct_sel])[0], sorted(w, key=key[wrong_sel])[0]


def test_ssopd_default_pair_prefix_length_weight_and_context():
    g = ssopd_group()
    plans, _, metrics = get_algorithm("ssopd").plan([g], HostState(), epoch=0)
    # shortest correct: lengths 3 at j=2 and j=6 -> first (2); longest wrong: 300 at 3 and 5 -> 3
    assert ref_pair(g, "shortest", "longest") == (2, 3)
    neg = plans[3]
    assert neg.route == "pg+ssopd" and neg.teacher_source == "privileged"
    assert neg.weights.ssopd_len == 256  # min(|y-| = 300, L_max = 256)
    assert neg.weights.ssopd_weight == pytest.approx(4 * 0.5 * 0.5)
    assert neg.teacher_messages == [
        {"role": "user", "content": "Q\nCorrect solution:\n\ny2\n" + TAIL}
    ]
    others = [p for j, p in enumerate(plans) if j != 3]
    assert all(p.weights == LossWeights(p.weights.advantage, pg_weight=1.0) for p in others)
    assert all(p.teacher_messages is None for p in others)
    np.testing.assert_allclose(
        [p.weights.advantage for p in plans], ref_advantages(g.rewards), rtol=1e-5, atol=1e-6
    )
    assert all(p.weights.pg_weight == 1.0 for p in plans)
    assert metrics["ssopd/num_pairs"] == 1.0


@pytest.mark.parametrize(
    "correct_sel,wrong_sel",
    list(
        itertools.product(
            ["shortest", "longest", "max-logp", "min-logp"], ["longest", "shortest", "min-logp"]
        )
    ),
)
def test_ssopd_every_selector(correct_sel, wrong_sel):
    g = ssopd_group()
    algo = get_algorithm("ssopd", correct_selector=correct_sel, wrong_selector=wrong_sel, max_len=5)
    plans, _, _ = algo.plan([g], HostState(), epoch=0)
    pos, neg = ref_pair(g, correct_sel, wrong_sel)
    marked = [j for j, p in enumerate(plans) if p.weights.ssopd_weight > 0]
    assert marked == [neg]
    assert plans[neg].weights.ssopd_len == min(len(g.rollouts[neg].response_ids), 5)
    assert f"\nCorrect solution:\n\ny{pos}\n" in plans[neg].teacher_messages[-1]["content"]


def test_ssopd_frontier_weight_and_degenerate_groups():
    groups = [group("a", [1, 0, 0, 0]), group("b", [1, 1]), group("c", [0, 0, 0])]
    plans, _, _ = get_algorithm("ssopd", frontier_scale=2.0).plan(groups, HostState(), epoch=0)
    omegas = [p.weights.ssopd_weight for p in plans]
    # p = 1/4 -> λ p (1-p) = 2 · 3/16; the longest wrong of equal lengths is the first wrong
    assert omegas[:4] == pytest.approx([0, 2 * 3 / 16, 0, 0])
    assert omegas[4:] == [0.0] * 5


def test_ssopd_rejects_unknown_selectors():
    with pytest.raises(ValueError, match="algorithm.correct_selector"):
        get_algorithm("ssopd", correct_selector="random")
    with pytest.raises(ValueError, match="algorithm.wrong_selector"):
        get_algorithm("ssopd", wrong_selector="max-logp")
    assert get_algorithm("ssopd").step_switches()["teacher_mode"] == "fixed"
