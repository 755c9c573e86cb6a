"""The miniature task family: every band's problems enumerated, balanced disjoint splits,
answers re-derived independently, and bad band specs / sizes refused by key."""

import collections
import operator
import re

import pytest

from jaxsd.tasks import get_task

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_miniature_splits_are_balanced_disjoint_deterministic_and_correct():
    task = get_task("miniature", seed=1)
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (240, 60)
    assert train == get_task("miniature", seed=1).load("train")
    assert test != get_task("miniature", seed=2).load("test")
    assert collections.Counter(r["band"] for r in train) == dict(easy=80, intermediate=80, hard=80)
    assert collections.Counter(r["band"] for r in test) == dict(easy=20, intermediate=20, hard=20)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    band_op = {"easy": "+", "intermediate": "-", "hard": "*"}
    for r in train + test:
        a, op, b = re.fullmatch(r"(\d)([+*-])(\d)=\?", r["prompt"]).groups()
        assert op == band_op[r["band"]]
        assert int(r["answer"]) == _OPS[op](int(a), int(b))
    # bands are interleaved: the first 12 test questions (one step's batch) hold all three
    assert {r["band"] for r in test[:12]} == set(band_op)
    assert [r["id"] for r in test[:2]] == ["test/0", "test/1"]


def test_miniature_verifier_is_arithmetics():
    task = get_task("miniature", train_size=3, test_size=3)
    for r in task.load("test"):
        assert task.verify(f"<answer>{r['answer']}</answer>", r).reward == 1.0
        wrong = str(int(r["answer"]) + 1)
        assert task.verify(f"<answer>{wrong}</answer>", r).feedback == (
            f"The answer {wrong} is incorrect."
        )


def test_miniature_custom_bands_and_errors():
    task = get_task("miniature", bands="a:+:2,b:*:3", train_size=4, test_size=2)
    assert collections.Counter(r["band"] for r in task.load("train")) == dict(a=2, b=2)
    with pytest.raises(ValueError, match=r"entry 'x:/:9' must be name:op:max_operand"):
        get_task("miniature", bands="x:/:9")
    with pytest.raises(ValueError, match="names a band twice"):
        get_task("miniature", bands="a:+:9,a:-:9")
    with pytest.raises(ValueError, match=r"task.kwargs.test_size=61 must be a positive multiple"):
        get_task("miniature", test_size=61)
    # 1-digit bands hold 100 problems each: 101 per band cannot be distinct
    with pytest.raises(ValueError, match="only 100 distinct problems"):
        get_task("miniature", train_size=243, test_size=60)
