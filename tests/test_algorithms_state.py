"""HostState JSON round trip, the registry, input validation and the step switches."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsd import algorithms
from jaxsd.algorithms import BufferEntry, Group, HostState, Rollout, get_algorithm

finite = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=20)


@settings(max_examples=40, deadline=None)
@given(
    ema=st.dictionaries(texts, finite, max_size=4),
    buffer=st.dictionaries(
        texts, st.lists(st.tuples(texts, finite), max_size=3).map(tuple), max_size=4
    ),
    frozen=st.dictionaries(texts, st.floats(0, 1), max_size=4),
    seed=st.integers(0, 2**63),
    num_plans=st.integers(0, 10**6),
)
def test_host_state_json_round_trip_is_exact(ema, buffer, frozen, seed, num_plans):
    state = HostState(
        ema_pass_rates=ema,
        success_buffer={q: tuple(BufferEntry(r, w) for r, w in e) for q, e in buffer.items()},
        frozen_pass_rates=frozen,
        rng_state=np.random.PCG64(seed).state,
        num_plans=num_plans,
    )
    text = state.to_json()
    back = HostState.from_json(text)
    assert back == state
    assert back.to_json() == text
    # floats survive bit for bit (json writes repr)
    for q, v in ema.items():
        assert np.float64(back.ema_pass_rates[q]).tobytes() == np.float64(v).tobytes()


@settings(max_examples=30, deadline=None)
@given(
    logps=st.lists(
        st.lists(st.floats(-30, 0, width=32), min_size=0, max_size=5), min_size=1, max_size=4
    ),
    reward=finite,
    feedback=st.one_of(st.none(), texts),
)
def test_groups_sampled_ahead_round_trip_through_json_exactly(logps, reward, feedback):
    """The async loop's checkpoint keeps the next step's verified groups (rollout.async_steps)."""
    rollouts = [
        Rollout(
            question_id=f"q{i % 2}",
            prompt=[{"role": "user", "content": f"Q{i % 2}"}],
            response=f"r{i}",
            response_ids=list(range(len(lp))),
            logprobs=np.asarray(lp, np.float32),
            reward=reward,
            feedback=feedback,
            entropy=None if i % 2 else 0.25,
        )  # fmt: skip
        for i, lp in enumerate(logps)
    ]
    groups = algorithms.group_rollouts(rollouts)
    rows = json.loads(json.dumps(algorithms.groups_to_json(groups)))
    back = algorithms.groups_from_json(rows)
    assert [g.question_id for g in back] == [g.question_id for g in groups]
    for a, b in zip(algorithms.flat_rollouts(back), algorithms.flat_rollouts(groups), strict=True):
        assert a.logprobs.dtype == np.float32 and a.logprobs.tobytes() == b.logprobs.tobytes()
        assert (a.question_id, a.prompt, a.response, a.response_ids, a.reward, a.feedback,
                a.entropy) == (b.question_id, b.prompt, b.response, list(b.response_ids),
                               b.reward, b.feedback, b.entropy)  # fmt: skip


def test_host_state_from_json_rejects_malformed_records():
    good = json.loads(HostState().to_json())
    for broken in ["{", json.dumps({**good, "num_plans": "x"}), json.dumps({"ema": {}})]:
        with pytest.raises(ValueError, match="HostState.to_json"):
            HostState.from_json(broken)


def test_registry_builds_every_method_and_names_bad_input():
    assert sorted(algorithms.REGISTRY) == sorted(
        ["sdpo", "sc_sdpo", "grpo", "paced", "hard_filter", "srpo", "ssopd", "drift"]
    )
    for name in algorithms.REGISTRY:
        algo = get_algorithm(name)
        assert algo.name == name
        switches = algo.step_switches()
        assert {
            "use_distillation",
            "use_surrogate",
            "use_ssopd",
            "use_rhythm",
            "teacher_mode",
        } <= set(switches)
    assert get_algorithm("sc_sdpo", exponent=1.0).exponent == 1.0
    with pytest.raises(ValueError, match="algorithm.name='ppo'"):
        get_algorithm("ppo")
    with pytest.raises(ValueError, match="algorithm.lr"):
        get_algorithm("grpo", lr=1.0)
    with pytest.raises(ValueError, match="algorithm.ema_alpha"):
        get_algorithm("drift", ema_alpha=1.5)
    with pytest.raises(ValueError, match="algorithm.exponent"):
        get_algorithm("sc_sdpo", exponent=-1.0)


def test_switches_match_the_objectives():
    on = {n: get_algorithm(n).step_switches() for n in algorithms.REGISTRY}
    assert on["grpo"]["use_surrogate"] and not on["grpo"]["use_distillation"]
    assert on["grpo"]["teacher_mode"] == "none"
    assert on["ssopd"]["use_ssopd"] and on["ssopd"]["teacher_mode"] == "fixed"
    assert on["drift"]["use_rhythm"] and on["drift"]["rhythm"]["window"] == 8
    for n in ("sdpo", "sc_sdpo", "paced", "hard_filter"):
        assert on[n]["use_distillation"] and not on[n]["use_surrogate"]


def test_rollouts_and_groups_reject_malformed_input():
    prompt = [{"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match="logprobs has 1 entries"):
        Rollout("q", prompt, "ab", [1, 2], np.zeros(1), 1.0)
    with pytest.raises(ValueError, match="reward=nan"):
        Rollout("q", prompt, "a", [1], np.zeros(1), float("nan"))
    r = Rollout("q", prompt, "a", [1], np.zeros(1), 1.0)
    with pytest.raises(ValueError, match="group_rollouts"):
        Group("other", (r,))
    with pytest.raises(ValueError, match="no rollouts"):
        Group("q", ())
    with pytest.raises(ValueError, match="epoch=-1"):
        get_algorithm("sdpo").plan([Group("q", (r,))], HostState(), epoch=-1)
    grouped = algorithms.group_rollouts([r, Rollout("p", prompt, "b", [2], np.zeros(1), 0.0), r])
    assert [(g.question_id, len(g)) for g in grouped] == [("q", 2), ("p", 1)]
    assert algorithms.flat_rollouts(grouped) == [r, r, grouped[1].rollouts[0]]
