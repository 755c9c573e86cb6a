"""Tool use (SDPO's ToolAlpaca rows) against the real data in ../shared/data."""

import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsd.tasks import get_task
from jaxsd.tasks.tool_use import parse_action_inputs


def write_out(golden_json: str) -> str:
    """A response that states every golden step in the prompt's format."""
    return "".join(
        f"Thought: I should call {s['Action']}.\nAction: {s['Action']}\n"
        f"Action Input: {s['Action_Input']}\n"
        for s in json.loads(golden_json)
    )


def sdpo_inputs_reference(text: str) -> dict:
    """SDPO's extract_action_inputs, re-derived from its published regex."""
    merged = {}
    for block in re.findall(r"Action Input:\s*({.*?})", text, re.DOTALL):
        try:
            merged.update(json.loads(block))
        except (ValueError, RecursionError):
            pass
    return merged


@pytest.fixture(scope="module")
def rows():
    return get_task("tooluse").load("test")


def test_exactly_66_of_68_solvable_by_writing_out_the_ground_truth(rows):
    task = get_task("tooluse")
    assert len(rows) == 68
    verdicts = {r["id"]: task.verify(write_out(r["answer"]), r) for r in rows}
    unsolved = sorted(i for i, v in verdicts.items() if v.reward != 1.0)
    assert sum(v.reward for v in verdicts.values()) == 66
    assert unsolved == ["tooluse/4072", "tooluse/4079"]
    by_id = {r["id"]: r for r in rows}
    # 4072: the golden input nests an object; SDPO's block ends at the FIRST "}", so the
    # written-out input is cut to invalid JSON and its parameters are never seen.
    golden_4072 = json.loads(json.loads(by_id["tooluse/4072"]["answer"])[0]["Action_Input"])
    assert isinstance(golden_4072["profileData"], dict)
    assert "Missing parameter 'profileData'" in verdicts["tooluse/4072"].feedback
    # 4079: the golden action "[Optional]updateUserProfile" is not a \w+ word, so no
    # response can ever produce it after "Action:".
    actions_4079 = [s["Action"] for s in json.loads(by_id["tooluse/4079"]["answer"])]
    assert "[Optional]updateUserProfile" in actions_4079
    assert "[Optional]updateUserProfile" in verdicts["tooluse/4079"].feedback
    for i, v in verdicts.items():
        assert (v.feedback is None) == (i not in unsolved)


def test_toolalpaca_prompts_rebuild_sdpo_rows_exactly(rows):
    built = {r["prompt"]: r["answer"] for r in get_task("toolalpaca").load("eval_simulated")}
    assert len(built) == 100
    for r in rows:
        assert r["prompt"] in built
        assert json.loads(built[r["prompt"]]) == json.loads(r["answer"])
    real = get_task("toolalpaca").load("eval_real")
    assert len(real) == 114
    task = get_task("toolalpaca")
    solved = sum(task.verify(write_out(r["answer"]), r).reward for r in real)
    assert solved >= 0.9 * len(real)


def test_messages_are_one_user_turn(rows):
    msgs = get_task("tooluse").messages(rows[0])
    assert msgs == [{"role": "user", "content": rows[0]["prompt"]}]
    assert msgs[0]["content"].endswith(
        "Question: Hey, can you show me a random picture of an axolotl?"
    )


def test_corrupted_ground_truth_scores_zero_with_named_differences(rows):
    task = get_task("tooluse")
    r = next(r for r in rows if r["id"] == "tooluse/4048")  # getAxolotlFacts habitat, 3
    good = write_out(r["answer"])
    wrong_action = task.verify(good.replace("Action: getAxolotlFacts", "Action: getFacts"), r)
    assert wrong_action.reward == 0.0
    assert "Expected action getAxolotlFacts, got getFacts." in wrong_action.feedback
    wrong_value = task.verify(good.replace('"limit": 3', '"limit": 5'), r)
    assert wrong_value.reward == 0.0
    assert "Wrong value for parameter 'limit': expected 3, got 5." in wrong_value.feedback
    missing = task.verify(good.replace('"category": "habitat", ', ""), r)
    assert "Missing parameter 'category'" in missing.feedback
    extra = task.verify(good + 'Action: getAxolotlFacts\nAction Input: {"lang": "en"}\n', r)
    assert "Unexpected action(s): getAxolotlFacts." in extra.feedback
    assert "Unexpected parameter(s): lang." in extra.feedback
    nothing = task.verify("I cannot help.", r)
    assert nothing.reward == 0.0 and "No 'Action:' line" in nothing.feedback
    sdpo = get_task("tooluse", feedback_style="sdpo").verify("Action: getFacts", r)
    assert sdpo.feedback.startswith("Actions mismatch: predicted ['getFacts']")


def test_extracted_is_order_insensitive_for_majority_voting():
    steps = [
        {"Action": "getA", "Action_Input": '{"x": 1}'},
        {"Action": "getB", "Action_Input": '{"y": "z"}'},
    ]
    record = {"answer": json.dumps(steps)}
    task = get_task("tooluse")
    a = task.verify(write_out(json.dumps(steps)), record)
    b = task.verify(write_out(json.dumps(steps[::-1])), record)
    assert a.extracted == b.extracted and a.reward == b.reward == 1.0


FRAGMENTS = st.sampled_from(
    [
        "Action Input:",
        "Action Input: ",
        "{",
        "}",
        '"a": 1',
        '"b": {"c": 2}',
        '"a": 2',
        ",",
        " ",
        "\n",
        "\u00a0",
        "x",
        "[",
        "]",
        '"',
        "Action:",
        "{}",
        '{"z": null}',
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAGMENTS, max_size=30).map("".join))
def test_input_scanner_matches_sdpo_regex(text):
    assert parse_action_inputs(text) == sdpo_inputs_reference(text)


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["getA", "getB", "x_y"]), st.sampled_from(["k", "m"]), st.integers(0, 2)
    ),
    max_size=4,
)


def merge(steps):
    out = {}
    for _, key, value in steps:
        out[key] = value
    return out


@settings(max_examples=200, deadline=None)
@given(STEPS.filter(bool), STEPS)
def test_reward_is_multiset_and_merged_input_equality(golden_steps, said_steps):
    golden = [{"Action": a, "Action_Input": json.dumps({k: v})} for a, k, v in golden_steps]
    said = [{"Action": a, "Action_Input": json.dumps({k: v})} for a, k, v in said_steps]
    expected = Counter(a for a, _, _ in golden_steps) == Counter(a for a, _, _ in said_steps)
    expected = expected and merge(golden_steps) == merge(said_steps)
    v = get_task("tooluse").verify(write_out(json.dumps(said)), {"answer": json.dumps(golden)})
    assert v.reward == float(expected)
    assert (v.feedback is None) == expected
