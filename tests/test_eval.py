"""mean@k / maj@k / best@k against hand-computed cases and Counter; evaluate() on a real task."""

import collections
import json
import os
import re
import runpy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsd import eval as E
from jaxsd.tasks import get_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_and_best_by_hand():
    correct = [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert E.mean_at_k(correct) == pytest.approx(6 / 12)
    assert E.best_at_k(correct) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="0/1"):
        E.mean_at_k([[0.5, 1.0]])
    with pytest.raises(ValueError, match=r"\[P, K\]"):
        E.best_at_k([1, 0])


@pytest.mark.parametrize(
    "answers, winner",
    [
        (["A", "B", "B", "A"], 0),  # 2-2 tie: A was seen first
        (["B", "A", "A", "B"], 0),  # 2-2 tie: B was seen first
        (["C", "A", "B", "B"], 2),  # B is the only answer seen twice
        ([None, None, None, "B"], 3),  # None never wins while any answer exists
        ([None, "x", None, "y", "y", None], 3),
        ([None, None], 0),  # all None: None "wins", first sample
    ],
)
def test_majority_index_by_hand(answers, winner):
    assert E.majority_index(answers) == winner


def test_maj_at_k_by_hand():
    extracted = [
        ["7", "5", "5", "7"],  # tie -> "7" (correct)
        ["3", None, None, None],  # "3" beats three Nones (wrong)
        [None, None, None, None],  # all None -> sample 0, wrong
        ["9", "8", "8", "9"],  # tie -> "9" (correct): seen before "8"
    ]
    correct = [
        [1, 0, 0, 1],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [1, 0, 0, 1],
    ]
    assert E.maj_at_k(extracted, correct) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="prompt 1: 3 answers"):
        E.maj_at_k([["a"] * 4, ["a"] * 3], [[1] * 4, [1] * 4])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from("abcd")), min_size=1, max_size=12))
def test_majority_matches_counter_most_common(answers):
    winner = E.majority_index(answers)
    real = [a for a in answers if a is not None]
    if not real:
        assert winner == 0
    else:
        # Counter.most_common orders equal counts by first occurrence.
        expected = collections.Counter(real).most_common(1)[0][0]
        assert answers[winner] == expected
        assert winner == answers.index(expected)


def test_task_report_and_average():
    rewards = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    extracted = [["1", "2", "2"], ["5", None, "6"]]
    rep = E.task_report(rewards, extracted)
    assert rep["mean@3"] == pytest.approx(1 / 6)
    assert rep["best@3"] == pytest.approx(1 / 2)
    assert rep["maj@3"] == 0.0  # "2" wins the first vote and is wrong
    assert rep["num_prompts"] == 2 and rep["k"] == 3
    other = E.task_report(np.ones((1, 3)), [["a", "a", "b"]])
    combined = E.average_reports({"t1": rep, "t2": other})
    assert combined["average"]["mean@3"] == pytest.approx((1 / 6 + 1) / 2)
    assert combined["average"]["maj@3"] == pytest.approx(0.5)
    flat = E.eval_metrics_for_log({"t1": rep, "t2": other})
    assert flat["eval/t1/best@3"] == pytest.approx(0.5)
    assert flat["eval/mean@3"] == pytest.approx((1 / 6 + 1) / 2)
    with pytest.raises(ValueError, match="different k"):
        E.average_reports({"a": rep, "b": E.task_report(np.ones((1, 2)), [["a", "a"]])})


def _scripted_generate(calls):
    """Per prompt `a+b=?`: k-th response is right for k % 4 == 0, off by one for k % 4 in
    {1, 2}, and unparseable for k % 4 == 3."""

    def generate(prompts, *, n, temperature, top_p, top_k, min_p, seed):
        calls.append(dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p))
        calls[-1]["seed"] = seed
        groups = []
        for messages in prompts:
            a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=\?", messages[-1]["content"]).groups()
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            group = []
            for k in range(n):
                if k % 4 == 0:
                    group.append(f"<answer>{value}</answer>")
                elif k % 4 in (1, 2):
                    group.append(f"<answer>{value + 1}</answer>")
                else:
                    group.append("no idea")
            groups.append(group)
        return groups

    return generate


def test_evaluate_on_arithmetic_task_matches_script():
    task = get_task("arithmetic", test_size=5, train_size=1)
    records = task.load("test")
    calls = []
    out = E.evaluate(_scripted_generate(calls), task, records)
    # METHODS §9 defaults: no top-k, no min-p
    assert calls == [dict(n=16, temperature=0.6, top_p=0.95, top_k=0, min_p=0.0, seed=0)]
    rep = out["report"]
    # 4 of 16 right; the wrong "value+1" appears 8 times and wins the vote; every prompt has one.
    assert rep["mean@16"] == pytest.approx(4 / 16)
    assert rep["maj@16"] == 0.0
    assert rep["best@16"] == 1.0
    assert rep["task"] == "arithmetic" and rep["num_prompts"] == 5
    assert [r["id"] for r in out["per_record"]] == [r["id"] for r in records]
    assert out["per_record"][0]["extracted"][3] is None


def test_evaluate_rejects_malformed_generation():
    task = get_task("arithmetic", test_size=2, train_size=1)
    records = task.load("test")

    def short(prompts, *, n, temperature, top_p, top_k, min_p, seed):
        return [["<answer>1</answer>"] * (n - 1) for _ in prompts]

    with pytest.raises(ValueError, match="15 responses for prompt 0, not 16"):
        E.evaluate(short, task, records)
    with pytest.raises(ValueError, match="1 groups for 2 prompts"):
        E.evaluate(lambda p, **kw: [["x"] * 16], task, records)


def test_eval_script_on_tiny_model_matches_direct_sampling(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from jaxsd.models import from_pretrained
    from jaxsd.models.sampler import generate
    from jaxsd.tasks.reprompt import chat_token_ids

    script = runpy.run_path(os.path.join(REPO, "scripts", "eval.py"))
    out = tmp_path / "eval.json"
    argv = ["--model", str(tiny_model_dir), "--task", "arithmetic", "--n", "2", "--limit", "3"]
    argv += ["--max_new_tokens", "8", "--seed", "0", "--out", str(out), "--keep_responses"]
    script["main"](argv)
    with open(out) as fh:
        result = json.load(fh)

    # Independent path: chat template -> sampler -> decode -> verifier, same seed and sampling.
    task = get_task("arithmetic")
    records = task.load("test")[:3]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, _ = from_pretrained(tiny_model_dir)
    with open(os.path.join(tiny_model_dir, "generation_config.json")) as fh:
        eos = json.load(fh)["eos_token_id"]
    sample = generate(
        model,
        [chat_token_ids(tokenizer, task.messages(r)) for r in records],
        n=2,
        max_new_tokens=8,
        temperature=0.6,
        top_p=0.95,
        stop_token_ids=eos if isinstance(eos, list) else [eos],
        seed=0,
    )
    texts = tokenizer.batch_decode(sample.token_ids, skip_special_tokens=True)
    assert [r["responses"] for r in result["per_record"]] == [texts[0:2], texts[2:4], texts[4:6]]
    assert any(texts), "the sampler produced only empty texts; the comparison would be vacuous"
    rewards = np.array([task.verify(t, records[i // 2]).reward for i, t in enumerate(texts)])
    rewards = rewards.reshape(3, 2)
    assert [r["rewards"] for r in result["per_record"]] == rewards.tolist()
    rep = result["report"]
    assert rep["mean@2"] == pytest.approx(rewards.mean())
    assert rep["best@2"] == pytest.approx(np.mean(rewards.max(axis=1) >= 0.5))
    assert rep["num_prompts"] == 3 and rep["model"] == str(tiny_model_dir)


def _band_generate(prompts, *, n, temperature, top_p, top_k, min_p, seed):
    """Sums always right; differences right on even k, the answer + 1 on odd k; products
    always the answer + 1."""
    groups = []
    for messages in prompts:
        a, op, b = re.fullmatch(r"(\d)([+*-])(\d)=\?", messages[-1]["content"]).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        right = [op == "+" or (op == "-" and k % 2 == 0) for k in range(n)]
        groups.append([f"<answer>{value if r else value + 1}</answer>" for r in right])
    return groups


def test_evaluate_reports_every_metric_per_band():
    task = get_task("miniature", train_size=3, test_size=6)
    records = task.load("test")
    out = E.evaluate(_band_generate, task, records, n=4)
    rep = out["report"]
    # by hand: easy 4/4 right; intermediate 2/4 (right first, so a 2-2 vote goes to it); hard 0/4
    assert rep["mean@4/band=easy"] == 1.0 and rep["maj@4/band=easy"] == 1.0
    assert rep["mean@4/band=intermediate"] == 0.5 and rep["maj@4/band=intermediate"] == 1.0
    assert rep["best@4/band=intermediate"] == 1.0
    assert rep["mean@4/band=hard"] == 0.0 and rep["best@4/band=hard"] == 0.0
    assert rep["mean@4"] == pytest.approx(1.5 / 3)  # 2 prompts per band: the bands' mean
    # eval/<metric>/band=<band> in the log; a task without bands does not dilute them
    plain = E.task_report(np.ones((1, 4)), [["1"] * 4])
    flat = E.eval_metrics_for_log({"miniature": rep, "arithmetic": plain})
    assert flat["eval/mean@4/band=intermediate"] == 0.5
    assert flat["eval/miniature/mean@4/band=hard"] == 0.0
    assert flat["eval/mean@4"] == pytest.approx((0.5 + 1.0) / 2)
    assert not any("band=" in k for k in E.evaluate(
        _scripted_generate([]), get_task("arithmetic", test_size=2, train_size=1),
        get_task("arithmetic", test_size=2, train_size=1).load("test"),
    )["report"])  # fmt: skip
