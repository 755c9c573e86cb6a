"""HostState JSON round trip, the registry, input validation and the step switches."""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsd import algorithms
from jaxsd.algorithms import (
    BufferEntry,
    DriftState,
    Group,
    HostState,
    PacedState,
    Rollout,
    get_algorithm,
)

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
    drift_state = DriftState(
        ema_pass_rates=ema,
        success_buffer={q: tuple(BufferEntry(r, w) for r, w in e) for q, e in buffer.items()},
        rng_state=np.random.PCG64(seed).state,
        num_plans=num_plans,
    )
    for state in (drift_state, PacedState(frozen_pass_rates=frozen), HostState()):
        text = state.to_json()
        back = type(state).from_json(text)
        assert back == state and type(back) is type(state)
        assert back.to_json() == text
    # floats survive bit for bit (json writes repr)
    back = DriftState.from_json(drift_state.to_json())
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


def test_each_algorithm_declares_its_own_state_type():
    """Only DRIFT and PACED remember anything; each keeps only its own fields."""
    types = {name: get_algorithm(name).state_type for name in algorithms.REGISTRY}
    assert types.pop("drift") is DriftState and types.pop("paced") is PacedState
    assert set(types.values()) == {HostState}
    for name in algorithms.REGISTRY:
        algo = get_algorithm(name)
        assert type(algo.init_state(0)) is algo.state_type
    fields = {f.name for f in dataclasses.fields(DriftState)}
    assert fields == {"ema_pass_rates", "success_buffer", "rng_state", "num_plans"}
    assert {f.name for f in dataclasses.fields(PacedState)} == {"frozen_pass_rates"}
    assert not dataclasses.fields(HostState)


# The record every checkpoint held while one HostState carried every method's memory.
SHARED_RECORD = {
    "ema_pass_rates": {},
    "success_buffer": {},
    "frozen_pass_rates": {},
    "rng_state": None,
    "num_plans": 0,
}


def test_checkpoints_of_the_shared_record_restore_with_the_same_meaning():
    rng = np.random.PCG64(5).state
    drift_record = {
        **SHARED_RECORD,
        "ema_pass_rates": {"q": 0.25},
        "success_buffer": {"q": [["sol", 1.0]]},
        "rng_state": rng,
        "num_plans": 7,
    }
    assert DriftState.from_json(json.dumps(drift_record)) == DriftState(
        {"q": 0.25}, {"q": (BufferEntry("sol", 1.0),)}, rng, 7
    )
    paced_record = {**SHARED_RECORD, "frozen_pass_rates": {"q": 0.5}}
    assert PacedState.from_json(json.dumps(paced_record)) == PacedState({"q": 0.5})
    assert HostState.from_json(json.dumps(SHARED_RECORD)) == HostState()
    # Another method's memory is refused, never dropped: DRIFT's record is not SDPO's.
    with pytest.raises(ValueError, match="'ema_pass_rates'.*HostState.*another algorithm"):
        HostState.from_json(json.dumps(drift_record))
    with pytest.raises(ValueError, match="'frozen_pass_rates'.*DriftState"):
        DriftState.from_json(json.dumps({**drift_record, "frozen_pass_rates": {"q": 0.5}}))


def test_host_state_from_json_rejects_malformed_records():
    good = json.loads(DriftState().to_json())
    for broken in ["{", "[]", json.dumps({**good, "num_plans": "x"}), json.dumps({"ema": {}})]:
        with pytest.raises(ValueError, match="DriftState.to_json|does not keep"):
            DriftState.from_json(broken)
    with pytest.raises(ValueError, match="PacedState.to_json"):
        PacedState.from_json(json.dumps({"frozen_pass_rates": {"q": "high"}}))


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
    with pytest.raises(ValueError, match="seeded DriftState.*DRIFT.init_state"):
        get_algorithm("drift").plan([Group("q", (r,))], HostState(), epoch=0)
    with pytest.raises(TypeError, match="PacedState"):
        algorithms.paced.freeze_pass_rates(HostState(), {"q": 0.5})
    grouped = algorithms.group_rollouts([r, Rollout("p", prompt, "b", [2], np.zeros(1), 0.0), r])
    assert [(g.question_id, len(g)) for g in grouped] == [("q", 2), ("p", 1)]
    assert algorithms.flat_rollouts(grouped) == [r, r, grouped[1].rollouts[0]]
