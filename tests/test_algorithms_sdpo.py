"""SDPO, SC-SDPO, hard filter and PACED plans on hand-built groups vs METHODS §1 and §5."""

import numpy as np
import pytest

from jaxsd.algorithms import Group, HostState, LossWeights, Rollout, get_algorithm, paced

SYSTEM = {"role": "system", "content": "Be brief."}
PROMPT = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
TAIL = "\n\nCorrectly solve the original question."


def roll(q, response, reward, feedback=None):
    ids = list(range(len(response)))
    return Rollout(q, PROMPT, response, ids, np.zeros(len(ids)), reward, feedback=feedback)


def solution_text(solution):
    """METHODS §1 written out by hand: prompt, solution section, closing line."""
    return "What is 2+2?" + "\nCorrect solution:\n\n" + solution + "\n" + TAIL


def feedback_text(feedback):
    head = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
    return "What is 2+2?" + head + feedback + "\n" + TAIL


def mixed_group(q="q0"):
    return Group(
        q,
        (
            roll(q, "five", 0.0, feedback="wrong answer 5"),
            roll(q, "<think>2 and 2</think>\n\nfour", 1.0),
            roll(q, "three", 0.0),
            roll(q, "4", 1.0),
        ),
    )


def failed_group(q="q1"):
    return Group(q, (roll(q, "five", 0.0, feedback="expected a number"), roll(q, "x", 0.0)))


def test_sdpo_teacher_is_first_other_success_think_stripped_feedback_only_without_solution():
    plans, state, metrics = get_algorithm("sdpo").plan(
        [mixed_group(), failed_group()], HostState(), epoch=0
    )
    expected_users = [
        solution_text("four"),  # feedback dropped: a solution exists
        solution_text("4"),  # never its own success
        solution_text("four"),
        solution_text("four"),
        feedback_text("expected a number"),
        None,  # neither solution nor feedback -> sd_mask 0
    ]
    for plan, user in zip(plans, expected_users, strict=True):
        if user is None:
            assert plan.teacher_messages is None and plan.weights.sd_weight == 0.0
            assert plan.route == "none"
            continue
        assert plan.teacher_messages == [SYSTEM, {"role": "user", "content": user}]
        assert plan.weights == LossWeights(sd_weight=1.0) and plan.route == "sd"
    assert [p.teacher_source for p in plans] == ["solution"] * 4 + ["feedback", "none"]
    assert state == HostState()
    assert metrics["route/sd"] == pytest.approx(5 / 6)
    assert metrics["pass_rate/frac_intermediate"] == 0.5


def test_sdpo_may_reprompt_on_own_success_when_asked():
    plans, _, _ = get_algorithm("sdpo", dont_reprompt_on_self_success=False).plan(
        [mixed_group()], HostState(), epoch=0
    )
    assert plans[1].teacher_messages[-1]["content"] == solution_text("four")
    assert plans[3].teacher_messages[-1]["content"] == solution_text("four")


def pass_rate_groups():
    """Five groups of G=4 with pass rates 0, 1/4, 1/2, 3/4, 1; wrong rollouts carry no feedback."""
    groups = []
    for i, n_ok in enumerate(range(5)):
        q = f"p{i}"
        rewards = [1.0] * n_ok + [0.0] * (4 - n_ok)
        groups.append(Group(q, tuple(roll(q, f"r{j}", r) for j, r in enumerate(rewards))))
    return groups


def reference_variance_weights(p, a, keep_mask):
    """w_i = w~_i / mean_{Q+} w~ on Q+, 0 elsewhere (METHODS §5), written from the formula."""
    raw = np.where(keep_mask, (p * (1 - p)) ** a, 0.0)
    return np.where(keep_mask, raw / raw[keep_mask].mean(), 0.0) if keep_mask.any() else raw


def sd_mask_of(groups):
    """sd_mask by hand: a rollout is distilled iff another rollout of its group succeeded."""
    out = []
    for g in groups:
        n_ok = sum(r.reward >= 0.5 for r in g.rollouts)
        out.append([float(n_ok - (r.reward >= 0.5) > 0) for r in g.rollouts])
    return np.asarray(out)


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_sc_sdpo_weights_are_batch_normalised_over_intermediate_questions(exponent):
    groups = pass_rate_groups()
    plans, _, metrics = get_algorithm("sc_sdpo", exponent=exponent).plan(
        groups, HostState(), epoch=3
    )
    p = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    w = reference_variance_weights(p, exponent, (p > 0) & (p < 1))
    if exponent == 1.0:  # closed form: 3/16, 1/4, 3/16 over their mean 5/24
        np.testing.assert_allclose(w, [0, 0.9, 1.2, 0.9, 0], rtol=1e-12)
    got = np.asarray([p.weights.sd_weight for p in plans]).reshape(5, 4)
    np.testing.assert_allclose(got, w[:, None] * sd_mask_of(groups), rtol=1e-6)
    # the lone success of the p=1/4 group has no other success: weight × sd_mask 0
    assert got[1, 0] == 0.0 and plans[4].teacher_messages is None
    assert metrics["question_weight/mean"] == pytest.approx(w.mean(), rel=1e-6)


def test_sc_sdpo_all_degenerate_batch_gives_zero_weights():
    groups = [pass_rate_groups()[0], pass_rate_groups()[4]]
    plans, _, _ = get_algorithm("sc_sdpo").plan(groups, HostState(), epoch=0)
    assert all(p.weights.sd_weight == 0.0 for p in plans)
    # teachers still exist for the all-correct group (the mask is not the weight)
    assert all(p.teacher_messages is not None for p in plans[4:])


def test_hard_filter_keeps_only_intermediate_questions():
    groups = pass_rate_groups()
    plans, _, _ = get_algorithm("hard_filter").plan(groups, HostState(), epoch=0)
    keep = np.array([0, 1, 1, 1, 0], dtype=float)
    got = np.asarray([p.weights.sd_weight for p in plans]).reshape(5, 4)
    np.testing.assert_array_equal(got, keep[:, None] * sd_mask_of(groups))


def test_paced_offline_rates_pool_groups_and_normalise_over_the_dataset():
    offline = [
        Group("a", (roll("a", "1", 1.0), roll("a", "2", 0.0))),
        Group("a", (roll("a", "3", 1.0), roll("a", "4", 1.0))),  # same question, second pass
        Group("b", (roll("b", "5", 1.0),) + tuple(roll("b", "6", 0.0) for _ in range(3))),
        Group("c", (roll("c", "7", 1.0), roll("c", "8", 1.0))),
        Group("d", (roll("d", "9", 0.0), roll("d", "0", 0.0))),
    ]
    rates = paced.estimate_pass_rates(offline)
    assert rates == {"a": 0.75, "b": 0.25, "c": 1.0, "d": 0.0}
    algo = get_algorithm("paced")
    state = paced.freeze_pass_rates(algo.init_state(0), rates)
    batch = [mixed_group("a")]  # this batch's own pass rate (1/2) must NOT matter
    plans, new_state, _ = algo.plan(batch, state, epoch=0)
    # global normalisation: w~ = p(1-p) over the dataset's Q+ = {a, b} (both 3/16) -> 1
    raw = {"a": 0.75 * 0.25, "b": 0.25 * 0.75}
    w_a = raw["a"] / np.mean(list(raw.values()))
    np.testing.assert_allclose([p.weights.sd_weight for p in plans], [w_a] * 4, rtol=1e-6)
    assert new_state == state  # frozen: planning never changes them
    weights = algo.question_weights(state)
    assert weights["c"] == 0.0 and weights["d"] == 0.0


def test_paced_global_normaliser_differs_from_batch_normaliser():
    algo = get_algorithm("paced")
    state = paced.freeze_pass_rates(paced.PacedState(), {"a": 0.5, "b": 0.1, "c": 0.9, "d": 1.0})
    w = algo.question_weights(state)
    raw = np.array([0.25, 0.09, 0.09])
    assert w["a"] == pytest.approx(0.25 / raw.mean(), rel=1e-6)
    assert w["a"] != pytest.approx(1.0)


def test_paced_errors_name_the_fix():
    algo = get_algorithm("paced")
    with pytest.raises(ValueError, match="offline pass"):
        algo.plan([mixed_group("a")], HostState(), epoch=0)
    state = paced.freeze_pass_rates(paced.PacedState(), {"b": 0.5})
    with pytest.raises(ValueError, match="'a'"):
        algo.plan([mixed_group("a")], state, epoch=0)
    with pytest.raises(ValueError, match="'b'.*\\[0, 1\\]"):
        paced.freeze_pass_rates(paced.PacedState(), {"b": 1.5})
