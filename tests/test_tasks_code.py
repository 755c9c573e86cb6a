"""Code tasks: MBPP's official split, prompts, code extraction, sandboxed verification with
SDPO feedback (the failing test, expected and actual), HumanEval assembly, and LiveCodeBench's
record format (hand-written rows in its release encoding)."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from jaxsd.tasks import get_task, task_names
from jaxsd.tasks.base import RecordError, verify_all
from jaxsd.tasks.code import (
    MBPP_BROKEN,
    NO_CODE_FEEDBACK,
    extract_code,
    lcb_record,
    truncate_tokens,
)


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


@pytest.fixture(scope="module")
def mbpp():
    task = get_task("mbpp", sandbox={"timeout_s": 10.0})
    yield task
    task.close()


def test_registered():
    assert {"mbpp", "humaneval", "livecodebench"} <= set(task_names())


def test_mbpp_official_split_by_task_id(mbpp):
    ids = {s: [int(r["id"].split("/")[1]) for r in mbpp.load(s)] for s in
           ("prompt", "test", "validation", "train")}  # fmt: skip
    assert ids["prompt"] == list(range(1, 11))
    assert ids["test"] == [i for i in range(11, 511) if i != 341]
    assert ids["validation"] == [i for i in range(511, 601) if i != 596]
    assert ids["train"] == [i for i in range(601, 975) if i != 642]
    kept = get_task("mbpp", keep_broken=True).load("test")
    assert len(kept) == 500 and "mbpp/341" in {r["id"] for r in kept}


def test_mbpp_prompt_is_the_benchmarks(mbpp):
    record = mbpp.load("test")[6]  # task 17
    assert record["id"] == "mbpp/17"
    assert mbpp.messages(record) == [
        {
            "role": "user",
            "content": "You are an expert Python programmer, and here is your task: Write a "
            "function to find the perimeter of a square. Your code should pass these tests:\n\n"
            "assert square_perimeter(10)==40\nassert square_perimeter(5)==20\n"
            "assert square_perimeter(4)==16\nWrite your solution in a ```python code block.",
        }
    ]


def test_right_solution_gets_reward_1_wrong_gets_0_with_the_failing_test(mbpp):
    record = next(r for r in mbpp.load("test") if r["id"] == "mbpp/17")
    right = mbpp.verify(block("def square_perimeter(a):\n    return 4 * a"), record)
    wrong = mbpp.verify(block("def square_perimeter(a):\n    return 2 * a"), record)
    crash = mbpp.verify(block("def square_perimeter(a):\n    return a.side * 4"), record)
    assert (right.reward, right.feedback) == (1.0, None)
    assert wrong.reward == 0.0
    assert wrong.feedback == (
        "Assertion failed: assert square_perimeter(10)==40\nExpected:\n40\nGot:\n20"
    )
    assert crash.reward == 0.0
    assert "assert square_perimeter(10)==40" in crash.feedback
    assert "AttributeError: 'int' object has no attribute 'side'" in crash.feedback
    none = mbpp.verify("def square_perimeter(a): return 4 * a", record)
    assert (none.reward, none.feedback) == (0.0, NO_CODE_FEEDBACK)


def test_reference_solutions_pass_except_the_known_broken_ones(mbpp):
    keep = get_task("mbpp", keep_broken=True, sandbox={"timeout_s": 10.0})
    records = [r for r in keep.load("test") + keep.load("validation") + keep.load("train")
               if r["id"] in {f"mbpp/{i}" for i in (*range(11, 35), *MBPP_BROKEN)}]  # fmt: skip
    verdicts = verify_all(keep, [block(r["answer"]) for r in records], records)
    keep.close()
    failed = {r["id"] for r, v in zip(records, verdicts, strict=True) if v.reward < 1}
    assert failed == {f"mbpp/{i}" for i in MBPP_BROKEN}
    by_id = {r["id"]: v for r, v in zip(records, verdicts, strict=True)}
    assert "Expected:\n104\nGot:\n88" in by_id["mbpp/596"].feedback


def test_extract_code_takes_the_last_python_block():
    text = "```python\nx = 1\n```\nthen\n```text\nnot code\n```\n```py\nx = 2\n```"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\nplain\n```") == "plain\n"
    assert extract_code("no fences") is None


def test_feedback_is_truncated_to_the_token_budget():
    text = "Expected: " + " ".join(str(i) for i in range(100))
    cut = truncate_tokens(text, 12)
    assert cut == "Expected: 0 1 2 3 4 5 6 7 8 9\n... (feedback truncated)"
    assert truncate_tokens("short", 12) == "short"
    with pytest.raises(ValueError, match="feedback_tokens"):
        get_task("mbpp", feedback_tokens=0)


def test_humaneval_full_function_or_completion():
    task = get_task("humaneval")
    records = task.load("test")
    assert len(records) == 164
    r = records[0]
    assert r["prompt"].startswith("Complete the following Python function.")
    body = r["answer"][len(r["stub"]) :]
    full = "def has_close_elements(numbers, threshold):\n" + body
    wrong = "def has_close_elements(numbers, threshold):\n    return False\n"
    verdicts = task.verify_many([block(full), block(body), block(wrong)], [r, r, r])
    task.close()
    assert [v.reward for v in verdicts] == [1.0, 1.0, 0.0]
    assert "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True" in verdicts[2].feedback


def _compressed(cases):
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


LCB_ROWS = [
    {  # AtCoder-style stdin problem, private tests in the lite release's compressed form
        "question_title": "Double",
        "question_content": "Read N and print 2N.",
        "platform": "atcoder",
        "question_id": "abc001_a",
        "contest_id": "abc001",
        "contest_date": "2024-09-01T00:00:00",
        "starter_code": "",
        "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}]),
        "private_test_cases": _compressed(
            [{"input": "50\n", "output": "100\n", "testtype": "stdin"}]
        ),  # fmt: skip
        "metadata": "{}",
    },
    {  # LeetCode-style functional problem
        "question_title": "Two Sum Count",
        "question_content": "Return a + b.",
        "platform": "leetcode",
        "question_id": "3000",
        "contest_id": "weekly-contest-400",
        "contest_date": "2024-08-01T00:00:00",
        "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
        "difficulty": "easy",
        "public_test_cases": json.dumps(
            [
                {"input": "1\n2", "output": "3", "testtype": "functional"},
                {"input": "-4\n4", "output": "0", "testtype": "functional"},
            ]
        ),  # fmt: skip
        "private_test_cases": "[]",
        "metadata": json.dumps({"func_name": "add"}),
    },
]


def test_livecodebench_loader_on_hand_written_records(tmp_path):
    path = tmp_path / "lcb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in LCB_ROWS))
    task = get_task("livecodebench", path=str(path), test_fraction=0.5)
    train, test = task.load("train"), task.load("test")
    assert [r["id"] for r in train] == ["livecodebench/3000"]  # the earlier contest
    assert [r["id"] for r in test] == ["livecodebench/abc001_a"]
    stdin, functional = test[0], train[0]
    assert stdin["kind"] == "stdio" and len(stdin["tests"]) == 2  # public + private
    assert stdin["prompt"].startswith("### Question:\nRead N and print 2N.\n\n### Format: Read")
    assert "```python\n# YOUR CODE HERE\n```" in stdin["prompt"]
    assert functional["kind"] == "functional" and functional["func_name"] == "add"
    assert "```python\nclass Solution:" in functional["prompt"]
    verdicts = task.verify_many(
        [block("print(2 * int(input()))"), block("print(int(input()) + 2)"),
         block("class Solution:\n    def add(self, a, b):\n        return a + b"),
         block("class Solution:\n    def add(self, a, b):\n        return a - b")],
        [stdin, stdin, functional, functional],
    )  # fmt: skip
    task.close()
    assert [v.reward for v in verdicts] == [1.0, 0.0, 1.0, 0.0]
    assert verdicts[1].feedback == ("Wrong output: test 1\nInput:\n3\n\nExpected:\n6\n\nGot:\n5\n")
    assert "Input:\n1\n2\nExpected:\n3\nGot:\n-1" in verdicts[3].feedback


def test_livecodebench_bad_records_name_the_field():
    row = dict(LCB_ROWS[0], public_test_cases="not json", private_test_cases="")
    with pytest.raises(RecordError, match="public_test_cases"):
        lcb_record(row, "lcb.jsonl record 0")
    row = dict(LCB_ROWS[1], metadata="{}")
    with pytest.raises(RecordError, match="func_name"):
        lcb_record(row, "lcb.jsonl record 1")
    evil = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()
    with pytest.raises(RecordError, match="refusing to load builtins.print"):
        lcb_record(dict(LCB_ROWS[0], private_test_cases=evil), "lcb.jsonl record 0")


def test_sdpo_reprompt_carries_the_test_feedback_only_when_no_sibling_succeeded(mbpp):
    from jaxsd.tasks.reprompt import build_group_reprompts

    record = next(r for r in mbpp.load("test") if r["id"] == "mbpp/17")
    wrong = block("def square_perimeter(a):\n    return 2 * a")
    right = block("def square_perimeter(a):\n    return 4 * a")
    prompt = mbpp.messages(record)
    for responses in ([wrong, wrong], [wrong, right]):
        verdicts = mbpp.verify_many(responses, [record, record])
        teachers = build_group_reprompts(
            prompt, responses, [v.reward for v in verdicts], [v.feedback for v in verdicts]
        )
        text = teachers[0].messages[-1]["content"]
        if responses[1] is wrong:  # no sibling succeeded: the environment's feedback
            assert (
                "feedback from your unsuccessful earlier attempt:\n\nAssertion failed: "
                "assert square_perimeter(10)==40\nExpected:\n40\nGot:\n20" in text
            )
        else:  # a sibling succeeded: its solution, and no feedback
            assert "Correct solution:\n\n" + right in text and "feedback" not in text
