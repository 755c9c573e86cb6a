"""Your own task without editing the package (README "Your own task and data").

- `task.name = "file:/path/data.jsonl"` (JSON lines, a JSON array or Parquet): one record per
  row with a prompt column and an answer column, scored by `task.reward = "module:function"`.
- `task.module = "my_tasks"` (or `path/to/my_tasks.py`): imported before the task is built,
  so a `register_task("my_task", MyTask)` at its top level makes `task.name = "my_task"` work.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from jaxsd.tasks.base import (
    RecordError,
    Task,
    Verdict,
    chat,
    get_task,
    load_table_rows,
    require,
    where,
)

FILE_PREFIX = "file:"


def import_module(spec: str, *, key: str, value: str | None = None) -> Any:
    """Import `spec`, a module name on sys.path or a `.py` file path; `key` names the config
    key in errors."""
    if spec.endswith(".py"):
        path = pathlib.Path(spec).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"config {key}: no file {path}")
        name = f"jaxsd_user_{path.stem}"
        if name in sys.modules:  # a second import would register its tasks twice
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"config {key}={value or repr(spec)} cannot be imported ({err}); put its folder on "
            "PYTHONPATH (e.g. PYTHONPATH=. when it sits in the current folder) or give a path "
            "ending in .py"
        ) from err


def import_function(spec: str, *, key: str) -> Callable[..., Any]:
    """`"module:function"` (module as in `import_module`) -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"config {key}={spec!r} must look like 'my_module:my_function'")
    fn = getattr(import_module(module_name, key=key, value=repr(spec)), attr, None)
    if not callable(fn):
        raise ValueError(f"config {key}={spec!r}: {module_name} has no function {attr!r}")
    return fn


def _verdict(value: Any, reward_name: str) -> Verdict:
    """A reward function's result: a number, a (number, feedback) pair or a Verdict."""
    if isinstance(value, Verdict):
        return value
    feedback = None
    if isinstance(value, tuple) and len(value) == 2:
        value, feedback = value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"reward function {reward_name} returned {type(value).__name__}; return a float, "
            "a (float, feedback str or None) pair or a jaxsd.tasks.Verdict"
        )
    if feedback is not None and not isinstance(feedback, str):
        raise TypeError(f"reward function {reward_name} returned a non-str feedback")
    return Verdict(reward=float(value), feedback=feedback, extracted=None)


class FileTask:
    """Prompts and answers from a JSONL / JSON / Parquet file, scored by your function.

    `reward(response, answer) -> float | (float, feedback) | Verdict`; the answer is the row's
    answer column as stored. Splits: "train" is the file; "test" is `test_file`, else the
    last `test_size` rows (then removed from train), else the training rows themselves.
    """

    def __init__(
        self,
        path: str,
        *,
        reward: str | Callable[..., Any],
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        system: str | None = None,
        test_file: str = "",
        test_size: int = 0,
    ) -> None:
        if not path:
            raise ValueError("config task.name='file:' needs a path: file:/path/data.jsonl")
        if not reward:
            raise ValueError(
                f"task file:{path} needs a reward function: --config.task.reward="
                "my_module:reward_fn (reward_fn(response, answer) -> float)"
            )
        if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 0:
            raise ValueError(f"config task.kwargs.test_size={test_size!r}: use an integer >= 0")
        self.path = pathlib.Path(path)
        self.name = FILE_PREFIX + self.path.stem  # short: it names eval/<task>/* metrics
        self.reward_name = reward if isinstance(reward, str) else repr(reward)
        self.reward = (
            import_function(reward, key="task.reward") if isinstance(reward, str) else reward
        )
        self.prompt_key, self.answer_key = prompt_key, answer_key
        self.system = system
        self.test_file = test_file
        self.test_size = test_size

    def _records(self, path: pathlib.Path) -> list[dict[str, Any]]:
        if not path.is_file():
            raise FileNotFoundError(f"task data file {path} not found (config task.name)")
        records = []
        for i, row in enumerate(load_table_rows(path)):
            loc = where(path, i)
            prompt = require(row, self.prompt_key, str, loc)
            if row.get(self.answer_key) is None:
                raise RecordError(
                    f"{loc}: missing answer column {self.answer_key!r}; another column name: "
                    "set task.kwargs.answer_key"
                )
            records.append(
                {"id": f"{path.name}/{i}", "system": self.system, "prompt": prompt,
                 "answer": row[self.answer_key]}
            )  # fmt: skip
        return records

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Records of "train" or "test" (`data_dir` is unused: the path is absolute)."""
        if split not in ("train", "test"):
            raise ValueError(f"{self.name}: split {split!r} does not exist; use train or test")
        if split == "test" and self.test_file:
            return self._records(pathlib.Path(self.test_file))
        records = self._records(self.path)
        if self.test_size >= len(records):
            raise ValueError(
                f"config task.kwargs.test_size={self.test_size} leaves no training rows of "
                f"{len(records)} in {self.path}"
            )
        if not self.test_size:
            return records
        return records[-self.test_size :] if split == "test" else records[: -self.test_size]

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """One user turn (after the optional system message)."""
        return chat(record["system"], record["prompt"])

    def verify(self, response: str, record: dict[str, Any]) -> Verdict:
        """Your reward function on (response, the row's answer)."""
        return _verdict(self.reward(response, record["answer"]), self.reward_name)


def task_from_config(task_cfg: Mapping[str, Any]) -> Task:
    """Build the task of a config's `task` section: imports `module`, passes `reward` to a
    `file:` task, `kwargs` to the task's constructor."""
    module = task_cfg.get("module", "")
    if module:
        import_module(module, key="task.module")
    name = task_cfg["name"]
    kwargs = dict(task_cfg.get("kwargs") or {})
    reward = task_cfg.get("reward", "")
    if name.startswith(FILE_PREFIX):
        return get_task(name, reward=reward, **kwargs)
    if reward:
        raise ValueError(
            f"config task.reward={reward!r} is only for file: tasks; task {name!r} has its own "
            "verifier (register a Task class through task.module to change it)"
        )
    return get_task(name, **kwargs)
