"""Math tasks (GSM8K, MATH-500, AIME, HMMT) on the real files in ../shared/data."""

import json
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsd.tasks import default_data_dir, get_task
from jaxsd.tasks.math import FORMAT_FEEDBACK, answers_match, last_boxed, normalize_answer


def test_gsm8k_answer_extraction_on_all_1319_test_answers():
    records = get_task("gsm8k").load("test")
    raw = [json.loads(line) for line in (default_data_dir() / "gsm8k/test.jsonl").open()]
    assert len(records) == len(raw) == 1319
    for rec, row in zip(records, raw, strict=True):
        # Independent reference: the text after "####", commas dropped, read as an int.
        expected = str(int(row["answer"].split("####")[-1].strip().replace(",", "")))
        assert rec["answer"] == expected
    answers = [r["answer"] for r in records]
    assert "2125" in answers and "-10" in answers and "1450000" in answers


@pytest.mark.parametrize(
    "name,split,size",
    [
        ("gsm8k", "test", 1319),
        ("math500", "test", 500),
        ("aime", "test", 30),
        ("aime", "2024", 30),
        ("aime", "2025", 30),
        ("hmmt", "test", 30),
    ],
)
def test_ground_truth_scores_one_and_corruption_zero(name, split, size):
    task = get_task(name)
    records = task.load(split)
    assert len(records) == size
    # verify_many: the symbolic checks of the corrupted answers run side by side.
    good = task.verify_many(
        [f"Some reasoning.\nThe answer is $\\boxed{{{r['answer']}}}$." for r in records], records
    )
    bad = task.verify_many([f"So \\boxed{{{r['answer']}+1}}." for r in records], records)
    for r, v, b in zip(records, good, bad, strict=True):
        assert r["prompt"].endswith("put your final answer within \\boxed{}.")
        assert v.reward == 1.0 and v.feedback is None, r["answer"]
        assert b.reward == 0.0 and "incorrect" in b.feedback, r["answer"]


def test_gsm8k_accepts_hash_marker_with_commas():
    task = get_task("gsm8k")
    r = next(r for r in task.load("test") if r["answer"] == "1450000")
    assert task.verify("so it is\n#### 1,450,000", r).reward == 1.0
    assert task.verify("#### $1,450,000.00", r).reward == 1.0
    assert task.verify("\\boxed{1450001}", r).reward == 0.0
    # A later "####" wins over an earlier box and vice versa.
    assert task.verify("\\boxed{3}\n#### 1450000", r).reward == 1.0
    assert task.verify("#### 3 ... \\boxed{1450000}", r).reward == 1.0


def test_missing_box_gets_sdpo_format_feedback():
    v = get_task("math500").verify("The answer is 5.", {"answer": "5"})
    assert (v.reward, v.extracted) == (0.0, None)
    assert v.feedback == (
        "Your answer had the wrong format. The solution must be given in the format: "
        "\\boxed{your_answer}."
    )
    assert FORMAT_FEEDBACK == v.feedback
    assert (
        get_task("math500", feedback_style="sdpo").verify("\\boxed{4}", {"answer": "5"}).feedback
        is None
    )


def test_last_boxed_matches_braces():
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # unclosed
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "a,b",
    [
        ("10,\\!080", "10080"),
        ("\\dfrac{3}{2}", "\\frac32"),
        ("1.5", "\\frac{3}{2}"),
        ("90^\\circ", "90"),
        ("x=5", "5"),
        ("025", "25"),
        ("\\text{Evelyn}", "Evelyn"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("-0.50", "-1/2"),
        ("50\\%", "50"),
        ("\\$18", "18"),
        ("11\\sqrt2", "11\\sqrt{2}"),
        ("5.", "5"),
    ],
)
def test_equivalent_forms_match(a, b):
    assert answers_match(a, b)


@pytest.mark.parametrize(
    "a,b",
    [
        ("1,-2", "-2,1"),
        ("2", "-2"),
        ("\\frac{1}{2}", "\\frac{1}{3}"),
        ("1,000", "1"),
        ("x^2", "x^3"),
        ("(3,4]", "(3,4)"),
    ],
)
def test_different_answers_do_not_match(a, b):
    assert not answers_match(a, b)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**6), 10**6), st.integers(1, 10**4))
def test_rational_forms_agree_with_fractions(num, den):
    value = Fraction(num, den)
    sign = "-" if value < 0 else ""
    frac = f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"
    slash = f"{value.numerator}/{value.denominator}"
    assert normalize_answer(frac) == normalize_answer(slash)
    if 10**6 % value.denominator == 0 or value.denominator in (1, 2, 4, 5, 8):
        decimal = f"{float(value):.6f}"
        assert Fraction(decimal) == value  # the decimal is exact
        assert normalize_answer(decimal) == normalize_answer(frac)
    assert normalize_answer(frac) != normalize_answer(f"{value.numerator + 1}/{value.denominator}")


# Equal answers our normaliser tells apart; math-verify (symbolic, in worker processes) does not.
SYMBOLIC_EQUAL = [
    ("√3/2", "\\frac{\\sqrt3}{2}"),
    ("2π", "π·2"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\text{(B)}", "B"),
    ("2√2", "√8"),
]
SYMBOLIC_DIFFERENT = [("2√2", "√2"), ("\\{1,2\\}", "\\{1,3\\}"), ("(x+1)^2", "x^2+1"), ("2π", "π")]


def test_math_verify_matches_forms_the_normaliser_misses():
    task = get_task("math500", verify_timeout_s=30.0)
    responses = [f"so \\boxed{{{pred}}}" for pred, _ in SYMBOLIC_EQUAL + SYMBOLIC_DIFFERENT]
    records = [{"answer": gold} for _, gold in SYMBOLIC_EQUAL + SYMBOLIC_DIFFERENT]
    for pred, gold in SYMBOLIC_EQUAL:
        assert not answers_match(pred, gold)  # what the normaliser alone says
    rewards = [v.reward for v in task.verify_many(responses, records)]
    assert rewards == [1.0] * len(SYMBOLIC_EQUAL) + [0.0] * len(SYMBOLIC_DIFFERENT)
    assert task.verify("\\boxed{2√2}", {"answer": "\\sqrt{8}"}).reward == 1.0
    # GSM8K keeps its exact integer path: no symbolic comparison, no worker.
    gsm8k = get_task("gsm8k")
    assert gsm8k.equivalence == "normalise"
    assert gsm8k.verify("\\boxed{2√2}", {"answer": "\\sqrt{8}"}).reward == 0.0


def test_an_answer_that_hangs_sympy_times_out_and_the_pool_recovers():
    """sympy never finishes 9^(9^(9^9)) vs 2; the worker is killed at the deadline, the answer
    scores 0, and the next answers use a fresh worker."""
    import time

    from jaxsd.tasks.equivalence import EquivalencePool

    pool = EquivalencePool(workers=1, timeout_s=2.0)
    try:
        pool.equal_many([("1", "1")])  # start the worker outside the timed part
        t0 = time.monotonic()
        got = pool.equal_many([("9^{9^{9^{9}}}", "2"), ("2√2", "√8"), ("x", "y")])
        elapsed = time.monotonic() - t0
        assert got == [False, True, False]
        assert pool.timeouts == 1
        assert 2.0 <= elapsed < 60.0  # the deadline, plus one worker restart (imports sympy)
    finally:
        pool.close()
    with pytest.raises(ValueError, match="timeout_s"):
        EquivalencePool(timeout_s=0)
    with pytest.raises(ValueError, match="equivalence"):
        get_task("aime", equivalence="sympy")


def test_every_math_task_accepts_each_of_its_constructors_keyword_arguments():
    from jaxsd.tasks.base import check_task_kwargs, task_names

    kwargs = {"feedback_style": "sdpo", "equivalence": "normalise", "verify_timeout_s": 1.0,
              "verify_workers": 1}  # fmt: skip
    math_tasks = [n for n in task_names() if n in ("gsm8k", "math500", "aime", "hmmt", "math_aime")]
    assert {"gsm8k", "math500", "math_aime"} <= set(math_tasks)
    for name in math_tasks:
        check_task_kwargs(name, kwargs)
        with pytest.raises(ValueError, match="task.kwargs.digits"):
            check_task_kwargs(name, {"digits": 1})
