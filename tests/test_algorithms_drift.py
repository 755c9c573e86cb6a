"""DRIFT host side vs METHODS §7: warm-up sib⁺, stage-2 routing, EMA bins, success buffer."""

import collections
import dataclasses

import numpy as np
import pytest

from jaxsd.algorithms import BufferEntry, Group, Rollout, drift, get_algorithm

PROMPT = [{"role": "user", "content": "Q"}]


def roll(q, response, reward, *, entropy=None, length=None):
    n = len(response) if length is None else length
    return Rollout(q, PROMPT, response, list(range(n)), np.zeros(n), reward, entropy=entropy)


def solution_of(plan):
    """The solution text inside a §1 reprompt (None when there is no teacher)."""
    if plan.teacher_messages is None:
        return None
    text = plan.teacher_messages[-1]["content"]
    head = "Q\nCorrect solution:\n\n"
    assert text.startswith(head) and text.endswith("\n\n\nCorrectly solve the original question.")
    return text[len(head) : -len("\n\n\nCorrectly solve the original question.")]


def group(q, rewards, lengths=None):
    lengths = lengths or [3] * len(rewards)
    return Group(
        q,
        tuple(
            roll(q, f"{q}{j}", r, length=n)
            for j, (r, n) in enumerate(zip(rewards, lengths, strict=True))
        ),
    )


def ref_advantages(rewards):
    r = np.asarray(rewards, float)
    return (r - r.mean()) / (r.std(ddof=1) + 1e-6)


def test_warmup_sibling_is_reward_first_entropy_second():
    q = "w"
    g = Group(
        q,
        (
            roll(q, "a", 1.0, entropy=0.1),
            roll(q, "b", 0.95, entropy=0.9),
            roll(q, "c", 0.8, entropy=2.0),  # highest entropy, but below r_max - δ
            roll(q, "d", 0.0, entropy=5.0),  # not a success
        ),
    )
    algo = get_algorithm("drift", warmup_steps=2, delta=0.1)
    plans, state, metrics = algo.plan([g], algo.init_state(0), epoch=0)
    # rollout 0: others' successes {b .95, c .8}, window [.85, .95] -> b
    # rollout 1: {a 1, c .8}, window [.9, 1] -> a;  rollout 2: {a, b} -> b (entropy .9 > .1)
    # rollout 3: {a, b, c}, window [.9, 1] -> {a, b} -> b
    assert [solution_of(p) for p in plans] == ["b", "a", "b", "b"]
    assert all(p.weights.sd_weight == 1.0 and p.weights.pg_weight == 0.0 for p in plans)
    assert metrics["drift/warmup"] == 1.0 and state.num_plans == 1
    # successes entered the buffer; the failure did not
    assert [e.response for e in state.success_buffer[q]] == ["a", "b", "c"]


def test_warmup_needs_entropy():
    g = Group("e", (roll("e", "a", 1.0), roll("e", "b", 1.0), roll("e", "c", 0.0)))
    algo = get_algorithm("drift")
    with pytest.raises(ValueError, match="entropy"):
        algo.plan([g], algo.init_state(0), epoch=0)


def stage2():
    return get_algorithm("drift", warmup_steps=0, buffer_warmup_epochs=1)


def test_stage2_negatives_distil_max_reward_shortest_positives_take_rhythm_grpo():
    # pass rate 3/5 (medium on first visit): γ = 1, β = 1
    g = Group(
        "m",
        (
            roll("m", "long-ok", 1.0, length=9),
            roll("m", "bad", 0.0),
            roll("m", "ok", 1.0, length=4),
            roll("m", "half", 0.7, length=2),
            roll("m", "bad2", 0.2),
        ),
    )
    algo = stage2()
    plans, state, metrics = algo.plan([g], algo.init_state(0), epoch=0)
    adv = ref_advantages(g.rewards)
    # negatives (reward < θ_r = .5): sib⁺ = max reward 1.0, tie -> shorter "ok"
    for j in (1, 4):
        assert plans[j].route == "sd" and solution_of(plans[j]) == "ok"
        assert plans[j].weights.sd_weight == 1.0 and plans[j].weights.pg_weight == 0.0
    # positives: GRPO advantage over the WHOLE group, γ = 1, gate on with sib⁺ context
    for j in (0, 2, 3):
        assert plans[j].route == "pg" and plans[j].weights.sd_weight == 0.0
        assert plans[j].weights.pg_weight == 1.0 and plans[j].weights.rhythm_beta == 1.0
        assert plans[j].weights.advantage == pytest.approx(adv[j], rel=1e-5)
    # a positive's sib⁺ is another success: max reward, ties -> shortest
    assert [solution_of(plans[j]) for j in (0, 2, 3)] == ["ok", "long-ok", "ok"]
    assert state.ema_pass_rates == {"m": 0.6}
    assert metrics["drift/frac_medium"] == 1.0


def ema_ref(pass_rates, alpha=0.7):
    r = None
    out = []
    for now in pass_rates:
        r = now if r is None else alpha * r + (1 - alpha) * now
        out.append(r)
    return out


@pytest.mark.parametrize(
    "visits,bin_,gamma,beta",
    [
        ([0.0, 0.25], "hard", 0.0, 0.0),  # r = .3 · .25 = .075 < .2
        ([1.0, 0.75], "easy", 0.5, 0.0),  # r = .7 + .225 = .925 > .8
        ([1.0, 0.0, 0.5], "medium", 1.0, 1.0),  # r = .7 · .3 + .15 = .36
    ],
)
def test_ema_routing_over_epochs(visits, bin_, gamma, beta):
    algo = stage2()
    state = algo.init_state(0)
    for epoch, rate in enumerate(visits):
        n_ok = int(rate * 4)
        g = group("q", [1.0] * n_ok + [0.0] * (4 - n_ok))
        plans, state, metrics = algo.plan([g], state, epoch=epoch)
    want = ema_ref(visits)[-1]
    assert state.ema_pass_rates["q"] == pytest.approx(want, abs=1e-12)
    assert metrics[f"drift/frac_{bin_}"] == 1.0
    positives = [p for p, r in zip(plans, g.rollouts, strict=True) if r.reward >= 0.5]
    assert positives
    assert all(p.weights.pg_weight == gamma and p.weights.rhythm_beta == beta for p in positives)
    # the gate's teacher exists only when the gate is on (and a sibling success exists)
    assert all((p.teacher_messages is not None) == (beta == 1.0) for p in positives)


def test_buffer_keeps_at_most_b_and_replaces_lowest_only_if_strictly_higher():
    entries = tuple(BufferEntry(t, r) for t, r in [("a", 0.6), ("b", 0.9), ("c", 0.7)])
    assert drift.buffer_add(entries, BufferEntry("d", 0.6), 3) == entries  # tie: no change
    got = drift.buffer_add(entries, BufferEntry("e", 0.8), 3)
    assert [(e.response, e.reward) for e in got] == [("e", 0.8), ("b", 0.9), ("c", 0.7)]
    assert drift.buffer_add(entries[:2], BufferEntry("f", 0.1), 3)[-1].response == "f"
    # through plan: five successes of rising reward, capacity 3
    algo = get_algorithm("drift", warmup_steps=0, buffer_size=3)
    g = Group("b", tuple(roll("b", f"s{j}", 0.5 + 0.1 * j) for j in range(5)))
    _, state, _ = algo.plan([g], algo.init_state(0), epoch=0)
    assert sorted(e.response for e in state.success_buffer["b"]) == ["s2", "s3", "s4"]


def failing(q="f", n=4):
    return group(q, [0.0] * n)


def seeded_with_buffer(seed=0):
    algo = stage2()
    state = algo.init_state(seed)
    buf = (BufferEntry("x", 1.0), BufferEntry("y", 0.9), BufferEntry("z", 0.8))
    return algo, dataclasses.replace(state, success_buffer={"f": buf})


def test_buffer_fallback_only_after_k_epochs():
    algo, state = seeded_with_buffer()
    plans, state0, m0 = algo.plan([failing()], state, epoch=0)  # epoch < k = 1
    assert all(p.teacher_messages is None and p.route == "none" for p in plans)
    assert m0["drift/buffer_hits"] == 0.0
    assert state0.rng_state == state.rng_state  # no draw happened
    plans, _, m1 = algo.plan([failing()], state, epoch=1)
    assert all(p.teacher_source == "buffer" and p.weights.sd_weight == 1.0 for p in plans)
    assert {solution_of(p) for p in plans} <= {"x", "y", "z"}
    assert m1["drift/buffer_hits"] == 4.0
    # a group WITH a success never uses the buffer for its negatives
    plans, _, _ = algo.plan([group("f", [1.0, 0.0])], state, epoch=5)
    assert plans[1].teacher_source == "solution" and solution_of(plans[1]) == "f0"


def test_buffer_draws_are_uniform_seeded_and_resume_exactly():
    algo, state = seeded_with_buffer(seed=3)
    plans, after, _ = algo.plan([failing(n=1500)], state, epoch=2)
    counts = collections.Counter(solution_of(p) for p in plans)
    assert set(counts) == {"x", "y", "z"}
    assert all(abs(c / 1500 - 1 / 3) < 0.06 for c in counts.values())  # ~5 sigma of 1500 draws
    again, _, _ = algo.plan([failing(n=1500)], state, epoch=2)
    assert [solution_of(p) for p in again] == [solution_of(p) for p in plans]
    # the RNG advances: the next step draws differently, and a JSON round trip keeps it
    small = [failing(n=20)]
    nxt, _, _ = algo.plan(small, after, epoch=2)
    restored, _, _ = algo.plan(small, algo.state_type.from_json(after.to_json()), epoch=2)
    first, _, _ = algo.plan(small, state, epoch=2)
    assert [solution_of(p) for p in nxt] == [solution_of(p) for p in restored]
    assert [solution_of(p) for p in nxt] != [solution_of(p) for p in first]


def test_drift_three_steps_equal_one_step_then_json_resume():
    algo = get_algorithm("drift", warmup_steps=1, buffer_warmup_epochs=1)
    q = "r"
    batches = [
        [Group(q, (roll(q, "a", 1.0, entropy=0.2), roll(q, "b", 0.0, entropy=0.1)))],
        [failing(q, 3)],
        [failing(q, 3), group("s", [1.0, 0.0, 0.0])],
    ]
    straight = algo.init_state(7)
    straight_plans = []
    for epoch, batch in enumerate(batches):
        plans, straight, _ = algo.plan(batch, straight, epoch=epoch)
        straight_plans += plans
    resumed, resumed_plans = algo.init_state(7), []
    for epoch, batch in enumerate(batches):
        plans, resumed, _ = algo.plan(batch, resumed, epoch=epoch)
        resumed = algo.state_type.from_json(resumed.to_json())  # a checkpoint after every step
        resumed_plans += plans
    assert resumed == straight and resumed_plans == straight_plans
    assert straight.num_plans == 3 and set(straight.ema_pass_rates) == {"r", "s"}
    assert straight_plans[2].teacher_source == "buffer"  # epoch 1 >= k: "a" from the buffer
