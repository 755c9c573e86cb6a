"""Registry, data location, malformed-record errors and verifier robustness on any text."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxsd.tasks import (
    DataFileError,
    RecordError,
    Task,
    Verdict,
    get_task,
    register_task,
    task_names,
    task_parameters,
)
from jaxsd.tasks.base import default_data_dir, load_json_rows

ALL = [
    "aime",
    "arithmetic",
    "gsm8k",
    "hmmt",
    "humaneval",
    "livecodebench",
    "math500",
    "math_aime",
    "mbpp",
    "miniature",
    "sciknoweval",
    "sciknoweval_biology",
    "sciknoweval_chemistry",
    "sciknoweval_material",
    "sciknoweval_physics",
    "tool_call",
    "toolalpaca",
    "tooluse",
]


def test_registry_lists_every_task_and_rejects_unknown_or_duplicate():
    assert task_names() == ALL
    for name in ALL:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
    with pytest.raises(KeyError, match="unknown task 'nope'.*tooluse"):
        get_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_task("gsm8k", lambda: None)


def test_data_dir_from_env_and_missing_file_message(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXSD_DATA_DIR", raising=False)
    beside_repo = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"
    # ../shared/data beside the checkout when it exists, else the workplace's fixed location.
    expected = (
        beside_repo if beside_repo.is_dir() else __import__("pathlib").Path("/work/shared/data")
    )
    assert default_data_dir().resolve() == expected.resolve()
    monkeypatch.setenv("JAXSD_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"gsm8k/test.jsonl.*JAXSD_DATA_DIR"):
        get_task("gsm8k").load("test")
    with pytest.raises(ValueError, match="split 'dev' does not exist"):
        get_task("gsm8k").load("dev")


@pytest.mark.parametrize(
    "text,where,why",
    [
        ("", None, "is empty"),
        ("\n  \n", None, "is empty"),
        ("{}\n{}\n", "line 1", "empty object {}"),
        ('{"question": "q", "answer": "#### 1"}\n{"question": "q",\n', "line 2", "not valid JSON"),
        ('{"question": "q", "answer": "#### 1"}\n[1, 2]\n', "line 2", "a JSON list"),
    ],
)
def test_data_file_problems_name_the_file_the_line_and_what_is_wrong(tmp_path, text, where, why):
    path = tmp_path / "gsm8k/train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(DataFileError) as err:
        get_task("gsm8k").load("train", data_dir=tmp_path)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(path) in message and why in message
    assert where is None or f"{path} {where}:" in message


def test_json_array_files_name_the_element_and_read_like_json_lines(tmp_path):
    array, lines = tmp_path / "a.json", tmp_path / "b.jsonl"
    rows = [{"x": 1, "y": "a"}, {"x": 2, "y": None}]
    array.write_text(json.dumps(rows, indent=2))
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_json_rows(array) == load_json_rows(lines) == rows
    array.write_text(json.dumps([{"x": 1}, {}]))
    with pytest.raises(DataFileError, match=r"a.json element 1: an empty object"):
        load_json_rows(array)


def test_task_kwargs_are_checked_against_the_task_parameters():
    assert task_parameters("arithmetic") == ("seed", "digits", "train_size", "test_size")
    assert task_parameters("gsm8k") == (
        "feedback_style", "equivalence", "verify_timeout_s", "verify_workers")  # fmt: skip
    with pytest.raises(ValueError, match=r"kwargs.digits is not a parameter of task 'gsm8k'"):
        get_task("gsm8k", digits=1)
    with pytest.raises(ValueError, match=r"train_size=0 must be an integer >= 1"):
        get_task("arithmetic", train_size=0)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD_MCQ = {"idx": 1, "answer": "A", "prompt": "q?", "system": "s"}


@pytest.mark.parametrize(
    "bad,field,why",
    [
        ({"prompt": None}, "prompt", "missing"),
        ({"answer": 3}, "answer", "must be str"),
        ({"answer": "E"}, "answer", "must be one of"),
        ({"prompt": ["q"]}, "prompt", "must be str"),
    ],
)
def test_malformed_mcq_record_names_file_index_field(tmp_path, bad, field, why):
    path = write_jsonl(
        tmp_path / "sciknoweval/physics/test.json", [GOOD_MCQ, GOOD_MCQ, {**GOOD_MCQ, **bad}]
    )
    with pytest.raises(RecordError) as err:
        get_task("sciknoweval_physics").load("test", data_dir=tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "record 2" in msg and f"'{field}'" in msg and why in msg


def test_malformed_tool_and_math_records(tmp_path):
    write_jsonl(
        tmp_path / "sdpo_tooluse/test.json",
        [{"idx": 1, "prompt": "p", "answer": '[{"Action": "a"}]'}],
    )
    with pytest.raises(
        RecordError, match=r"test.json record 0 answer step 0: missing field 'Action_Input'"
    ):
        get_task("tooluse").load("test", data_dir=tmp_path)
    write_jsonl(tmp_path / "sdpo_tooluse/test.json", [{"idx": 1, "prompt": "p", "answer": "[{"}])
    with pytest.raises(RecordError, match="record 0: field 'answer' is not valid JSON"):
        get_task("tooluse").load("test", data_dir=tmp_path)
    write_jsonl(
        tmp_path / "gsm8k/test.jsonl",
        [{"question": "q", "answer": "#### 4"}, {"question": "q", "answer": "four"}],
    )
    with pytest.raises(RecordError, match=r"test.jsonl record 1: field 'answer' has no '####"):
        get_task("gsm8k").load("test", data_dir=tmp_path)
    (tmp_path / "toolalpaca").mkdir()
    (tmp_path / "toolalpaca/eval_real.json").write_text(
        json.dumps(
            [
                {
                    "Name": "n",
                    "Description": "d",
                    "NLDocumentation": "x\n",
                    "Instructions": ["a", "b"],
                    "Golden_Answers": [[{"Action": "f", "Action_Input": "{}"}]],
                }
            ]
        )
    )
    with pytest.raises(RecordError, match="eval_real.json record 0: fields 'Instructions'"):
        get_task("toolalpaca").load("eval_real", data_dir=tmp_path)


# One representative record per verifier family.
RECORDS = {
    "sciknoweval": {"answer": "C", "system": "s", "prompt": "q"},
    "tooluse": {"answer": json.dumps([{"Action": "getA", "Action_Input": '{"x": {"y": 1}}'}])},
    "gsm8k": {"answer": "1450000"},
    "math500": {"answer": "\\frac{1}{2}"},
    "arithmetic": {"answer": "-48"},
    "tool_call": {"answer": json.dumps([{"Action": "getA", "Action_Input": '{"x": 1}'}])},
}
TASKS = {name: get_task(name) for name in RECORDS}

TAGGY = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "<answer>",
                "</answer>",
                "\\boxed{",
                "{",
                "}",
                "####",
                "Action:",
                "Action Input:",
                '{"x": ',
                "[[[[",
                "<think>",
                "</think>",
                "\\frac{",
                "1,000",
                "-",
                "NaN",
                "1e999999",
                "\\text{",
                "\u202e",
                "\x00",
            ]
        ),
        st.text(max_size=20),
    ),
    max_size=40,
).map("".join)


def check(v: Verdict) -> None:
    assert isinstance(v, Verdict) and v.reward in (0.0, 1.0)
    assert v.feedback is None or isinstance(v.feedback, str)
    assert v.extracted is None or isinstance(v.extracted, str)
    assert (v.feedback is None) or v.reward == 0.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), TAGGY))
def test_verifiers_never_raise_on_arbitrary_text(text):
    for name, task in TASKS.items():
        check(task.verify(text, RECORDS[name]))


MB = 1 << 20
ADVERSARIAL = {
    "unclosed_action_inputs": "Action Input: {" * (MB // 15),
    "unclosed_boxes": "\\boxed{" * (MB // 7),
    "unclosed_think_and_answers": "<answer><think>" * (MB // 15),
    "deep_json": "Action Input: " + "[" * MB + "}",
    "deep_json_object": "Action Input: " + '{"a":' * (MB // 5) + "}",
    "hash_spaces": "####" + " " * MB + "x",
    "digits": "\\boxed{" + "9" * MB + "}",
    "commas": "#### " + "," * MB,
    "random_unicode": "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(MB // 4)),
}


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
def test_one_megabyte_inputs_finish_quickly(kind):
    text = ADVERSARIAL[kind]
    for name, task in TASKS.items():
        start = time.perf_counter()
        check(task.verify(text, RECORDS[name]))
        assert time.perf_counter() - start < 2.0, (kind, name)
