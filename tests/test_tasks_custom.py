"""Your own task and data (README "Your own task and data"): the README's example trains,
file tasks read JSONL / Parquet with your columns and reward, a module registers a Task
class, and prompts longer than task.max_prompt_len are dropped and counted, never cut."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from jaxsd.metrics import read_metrics
from jaxsd.tasks import RecordError, Verdict, get_task
from jaxsd.tasks.custom import task_from_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains_on_a_custom_jsonl(tmp_path):
    script = _readme_block("### Your own task and data")
    env = dict(
        os.environ,
        JAXSD=str(REPO),
        JAX_PLATFORMS="cpu",
        PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    proc = subprocess.run(
        ["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(tmp_path / "runs" / "mine")
    first = rows[0]
    assert first["step"] == 0
    # 30 rows, the last 6 held out; every prompt fits the smoke preset's 128 tokens.
    assert (first["data/train_prompts"], first["data/test_prompts"]) == (24.0, 6.0)
    assert first["data/train_overlong"] == first["data/test_overlong"] == 0.0
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0.0 <= r["rollout/reward"] <= 1.0 for r in steps)


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _quarter(response: str, answer: str) -> float:
    return 0.25 if answer in response else 0.0


def test_file_task_reads_columns_splits_and_parquet(tmp_path):
    import datasets

    rows = [{"q": f"question {i}", "gold": str(i)} for i in range(5)]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(parquet))
    task = get_task(
        f"file:{jsonl}", reward=_quarter, prompt_key="q", answer_key="gold", system="Be brief.",
        test_size=2,
    )  # fmt: skip
    train, test = task.load("train"), task.load("test")
    assert [r["prompt"] for r in train] == ["question 0", "question 1", "question 2"]
    assert [r["answer"] for r in test] == ["3", "4"]
    assert task.messages(train[0]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question 0"},
    ]
    assert task.verify("it is 3", test[0]).reward == 0.25
    assert task.verify("it is 5", test[0]).reward == 0.0
    task = get_task(
        f"file:{jsonl}", reward=_quarter, prompt_key="q", answer_key="gold", test_file=str(parquet)
    )
    assert [r["prompt"] for r in task.load("test")] == ["question 0", "question 1"]
    assert len(task.load("train")) == 5


def test_reward_by_import_path_and_its_feedback(tmp_path):
    (tmp_path / "rewards_x1.py").write_text(
        "def exact(response, answer):\n"
        "    ok = response.strip() == answer\n"
        "    return float(ok), None if ok else f'expected {answer}'\n"
        "def wrong(response, answer):\n"
        "    return 'yes'\n"
    )
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    cfg = {"name": f"file:{data}", "reward": f"{tmp_path / 'rewards_x1.py'}:exact"}
    task = task_from_config(cfg)
    record = task.load("test")[0]  # no test split given: the training rows
    assert task.verify(" 4 ", record) == Verdict(reward=1.0, feedback=None, extracted=None)
    assert task.verify("5", record).feedback == "expected 4"
    bad = task_from_config({**cfg, "reward": f"{tmp_path / 'rewards_x1.py'}:wrong"})
    with pytest.raises(TypeError, match="returned str"):
        bad.verify("4", record)


def test_bad_custom_task_settings_name_the_problem(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(RecordError, match=r"d\.jsonl record 1: missing answer column 'answer'"):
        get_task(f"file:{data}", reward=_quarter).load("train")
    with pytest.raises(ValueError, match="task.reward"):
        task_from_config({"name": f"file:{data}"})
    with pytest.raises(ValueError, match="my_module:my_function"):
        task_from_config({"name": f"file:{data}", "reward": "no_colon"})
    with pytest.raises(ModuleNotFoundError, match="task.reward='nope_mod_x:f'.*PYTHONPATH"):
        task_from_config({"name": f"file:{data}", "reward": "nope_mod_x:f"})
    with pytest.raises(ValueError, match="only for file: tasks"):
        task_from_config({"name": "arithmetic", "reward": "x:y"})
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        get_task(f"file:{tmp_path / 'missing.jsonl'}", reward=_quarter).load("train")
    good = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "answer": "1"}] * 2)
    with pytest.raises(ValueError, match="test_size=2 leaves no training rows of 2"):
        get_task(f"file:{good}", reward=_quarter, test_size=2).load("train")


def test_task_module_registers_its_own_task_class(tmp_path, monkeypatch):
    from jaxsd.tasks import base

    # The registry as it was, once this test ends (other tests list the tasks); the module's
    # cache entry goes too, so a rerun registers afresh.
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setitem(sys.modules, "jaxsd_user_my_tasks_x2", None)
    del sys.modules["jaxsd_user_my_tasks_x2"]
    (tmp_path / "my_tasks_x2.py").write_text(
        "from jaxsd.tasks import Verdict, register_task\n"
        "class Echo:\n"
        "    name = 'echo_x2'\n"
        "    def __init__(self, word='hi'):\n"
        "        self.word = word\n"
        "    def load(self, split, data_dir=None):\n"
        "        return [{'id': '0', 'system': None, 'prompt': self.word, 'answer': self.word}]\n"
        "    def messages(self, record):\n"
        "        return [{'role': 'user', 'content': record['prompt']}]\n"
        "    def verify(self, response, record):\n"
        "        return Verdict(float(response == record['answer']), None, response)\n"
        "register_task('echo_x2', Echo)\n"
    )
    module = str(tmp_path / "my_tasks_x2.py")
    task = task_from_config({"name": "echo_x2", "module": module, "kwargs": {"word": "yo"}})
    assert task.load("train")[0]["prompt"] == "yo" and task.verify("yo", {"answer": "yo"}).reward
    # Importing it again (eval after train) does not register the name twice.
    assert task_from_config({"name": "echo_x2", "module": module}).word == "hi"


def test_overlong_prompts_are_dropped_and_counted_never_cut(tmp_path):
    from transformers import AutoTokenizer

    from configs import sdpo
    from jaxsd.train.build import fitting_prompts
    from jaxsd.train.rollout_worker import ChatPrompts
    from jaxsd.train.settings import run_settings

    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny_base")
    rows = [{"prompt": " ".join(["word"] * n), "answer": "1"} for n in (1, 40, 3, 90, 7, 200)]
    task = get_task(f"file:{_write_jsonl(tmp_path / 'd.jsonl', rows)}", reward=_quarter)

    def length(record):  # independent of chat_token_ids: the template tokenised by HF
        ids = tokenizer.apply_chat_template(
            task.messages(record), tokenize=True, add_generation_prompt=True
        )
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _fit(settings, tokenizer, task, records, split):
        return fitting_prompts(
            settings, ChatPrompts(tokenizer, settings.prompts), task, records, split
        )

    lengths = [length(r) for r in task.load("train")]
    cfg = sdpo.get_config("smoke")
    cfg.task.max_prompt_len = sorted(lengths)[3]  # the 4 shortest fit, 2 do not
    records = task.load("train")
    kept, stats = _fit(run_settings(cfg), tokenizer, task, records, "train")
    want = [r["prompt"] for r, n in zip(rows, lengths, strict=True) if n <= sorted(lengths)[3]]
    assert [r["prompt"] for r in kept] == want and len(want) == 4
    assert stats == {"data/train_prompts": 4.0, "data/train_overlong": 2.0}
    cfg.task.overlong_prompts = "error"
    with pytest.raises(ValueError, match="2 of 6 train prompts are longer than task.max_prompt"):
        _fit(run_settings(cfg), tokenizer, task, records, "train")
    cfg.task.overlong_prompts = "filter"
    cfg.task.max_prompt_len = 2  # nothing fits: an error, not an empty run
    with pytest.raises(ValueError, match="6 of 6 train prompts"):
        _fit(run_settings(cfg), tokenizer, task, records, "train")


def test_eval_and_compare_see_file_tasks(tmp_path, tiny_model_dir, repo_module):
    """scripts/eval.py scores a file task with the given reward (a constant 1 here, so
    mean@2 is 1 whatever the random model writes); compare's --set takes task.kwargs."""
    (tmp_path / "always_x3.py").write_text("def one(response, answer):\n    return 1.0\n")
    data = _write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": "a"} for i in range(3)]
    )
    result = repo_module("scripts/eval.py").main(
        ["--model", str(tiny_model_dir), "--task", f"file:{data}",
         "--reward", f"{tmp_path / 'always_x3.py'}:one", "--split", "train", "--n", "2",
         "--limit", "2", "--max_new_tokens", "3"]
    )  # fmt: skip
    assert result["report"]["task"] == "file:d"
    assert result["report"]["mean@2"] == 1.0 and len(result["per_record"]) == 2
    assert (result["report"]["data/train_prompts"], result["report"]["data/train_overlong"]) == (
        2.0, 0.0,
    )  # fmt: skip

    from configs import sdpo
    from jaxsd.train.compare import _set

    cfg = sdpo.get_config("smoke")
    _set(cfg, "task.name", f"file:{data}")
    _set(cfg, "task.kwargs", "{'test_size': 1, 'prompt_key': 'prompt'}")
    assert dict(cfg.task.kwargs) == {"test_size": 1, "prompt_key": "prompt"}
