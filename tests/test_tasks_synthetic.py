"""Offline synthetic tasks: deterministic per seed, disjoint splits, real verifiers."""

import json
import re

from jaxsd.tasks import get_task


def test_arithmetic_is_deterministic_disjoint_and_correct():
    a, b = get_task("arithmetic", seed=3), get_task("arithmetic", seed=3)
    assert a.load("train") == b.load("train") and a.load("test") == b.load("test")
    assert a.load("test") != get_task("arithmetic", seed=4).load("test")
    train, test = a.load("train"), a.load("test")
    assert (len(train), len(test)) == (2000, 200)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train + test:
        m = re.fullmatch(r"(\d{1,2})([+-])(\d{1,2})=\?", r["prompt"])
        x, op, y = int(m.group(1)), m.group(2), int(m.group(3))
        assert int(r["answer"]) == (x + y if op == "+" else x - y)
        assert len(r["prompt"]) + len(r["system"]) < 60  # fits a tiny model's context


def test_arithmetic_verifier_accepts_both_formats_and_explains_errors():
    task = get_task("arithmetic")
    for r in task.load("test")[:50]:
        assert task.verify(f"<answer>{r['answer']}</answer>", r).reward == 1.0
        assert task.verify(f"\\boxed{{{r['answer']}}}", r).reward == 1.0
        wrong = str(int(r["answer"]) + 1)
        v = task.verify(f"<answer>{wrong}</answer>", r)
        assert v.reward == 0.0 and v.feedback == f"The answer {wrong} is incorrect."
        assert v.extracted == wrong
    v = task.verify("no idea", task.load("test")[0])
    assert v.reward == 0.0 and "<answer>" in v.feedback


def test_tool_call_is_deterministic_and_solvable():
    task = get_task("tool_call", seed=1)
    test = task.load("test")
    assert test == get_task("tool_call", seed=1).load("test")
    assert test != get_task("tool_call", seed=2).load("test")
    assert not {r["prompt"] for r in task.load("train")} & {r["prompt"] for r in test}
    for r in test:
        (step,) = json.loads(r["answer"])
        args = json.loads(step["Action_Input"])
        listing, request = r["prompt"].removeprefix("Tools: ").split("\n")
        assert f"{step['Action']}({','.join(args)})" in listing.split(" ")
        assert all(f"{k} {v}" in request for k, v in args.items())
        assert len(r["prompt"]) < 120
        good = f"Action: {step['Action']}\nAction Input: {step['Action_Input']}"
        assert task.verify(good, r).reward == 1.0
        v = task.verify(good.replace(step["Action"], "noTool"), r)
        assert v.reward == 0.0 and f"Expected action {step['Action']}, got noTool." in v.feedback
