"""Task protocol, verdicts, the task registry and validated record loading."""

from __future__ import annotations

import inspect
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

# Repo root is three levels above this file (jaxsd/tasks/base.py).
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA_DIR_ENV = "JAXSD_DATA_DIR"


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one response: reward, environment feedback, voted answer."""

    reward: float
    feedback: str | None
    extracted: str | None


@runtime_checkable
class Task(Protocol):
    """A dataset + prompt + verifier. Records are plain dicts with at least
    `id`, `system` (str | None), `prompt` (the user message) and `answer`."""

    name: str

    def load(
        self, split: str, data_dir: str | os.PathLike | None = None
    ) -> list[dict[str, Any]]: ...

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]: ...

    def verify(self, response: str, record: dict[str, Any]) -> Verdict: ...


def verify_all(task: Task, responses: list[str], records: list[dict[str, Any]]) -> list[Verdict]:
    """`task.verify` of each (response, record); a task's own `verify_many` when it has one
    (math: the symbolic checks run side by side in worker processes)."""
    if hasattr(task, "verify_many"):
        return list(task.verify_many(responses, records))
    return [task.verify(r, rec) for r, rec in zip(responses, records, strict=True)]


class RecordError(ValueError):
    """A dataset record is malformed (missing field or wrong type)."""


class DataFileError(ValueError):
    """A data file cannot be read as records; the message names the file, the line and why."""


_REGISTRY: dict[str, Callable[..., Task]] = {}
_PARAMS: dict[str, tuple[str, ...] | None] = {}


def _keyword_names(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    """Keyword parameters of `factory`; None when it takes **kwargs (unknown names)."""
    names = []
    for param in inspect.signature(factory).parameters.values():
        if param.kind is param.VAR_KEYWORD:
            return None
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            names.append(param.name)
    return tuple(names)


def register_task(
    name: str, factory: Callable[..., Task], *, params: Sequence[str] | None = None
) -> None:
    """Register `factory(**kwargs) -> Task` under `name` (a name may be registered once).

    `params`: the keyword arguments the task takes, for a factory whose signature hides them
    (`lambda **kw: ...`); by default they are read from the factory's signature.
    """
    if name in _REGISTRY:
        raise ValueError(f"task {name!r} is already registered")
    _REGISTRY[name] = factory
    _PARAMS[name] = tuple(params) if params is not None else _keyword_names(factory)


def task_parameters(name: str) -> tuple[str, ...] | None:
    """The keyword arguments task `name` accepts (None: not known, anything goes through)."""
    if name.startswith("file:"):
        from jaxsd.tasks.custom import FileTask

        return tuple(p for p in _keyword_names(FileTask) or () if p != "path")
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}")
    return _PARAMS[name]


def check_task_kwargs(name: str, kwargs: dict[str, Any], key: str = "task.kwargs") -> None:
    """Raise ValueError naming `<key>.<arg>` when task `name` has no such parameter."""
    accepted = task_parameters(name)
    if accepted is None:
        return
    for arg in kwargs:
        if arg not in accepted:
            takes = ", ".join(accepted) or "no arguments"
            raise ValueError(
                f"config {key}.{arg} is not a parameter of task {name!r} (it takes: {takes}); "
                f"drop {arg!r} from {key} (a preset's kwargs belong to the preset's own task)"
            )


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as `name` (or `file:<path>`, jaxsd.tasks.custom); kwargs go
    to its constructor and must be parameters of it (ValueError naming the one that is not)."""
    check_task_kwargs(name, kwargs)
    if name.startswith("file:"):
        from jaxsd.tasks.custom import FileTask

        return FileTask(name.removeprefix("file:"), **kwargs)
    return _REGISTRY[name](**kwargs)


def task_names() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)


# Where the project's shared data lives when no $JAXSD_DATA_DIR is set: beside the checkout,
# else the workplace's fixed location (a clone elsewhere, e.g. a CI scratch folder).
_DEFAULT_DATA_DIRS = (_REPO_ROOT.parent / "shared" / "data", pathlib.Path("/work/shared/data"))


def default_data_dir() -> pathlib.Path:
    """$JAXSD_DATA_DIR, else ../shared/data next to the repository (or /work/shared/data)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return pathlib.Path(env)
    for candidate in _DEFAULT_DATA_DIRS:
        if candidate.is_dir():
            return candidate
    return _DEFAULT_DATA_DIRS[0]


def resolve_data_file(data_dir: str | os.PathLike | None, relative: str) -> pathlib.Path:
    """`data_dir / relative`, raising a FileNotFoundError that says how to fix it."""
    root = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} not found; pass data_dir=... or set ${DATA_DIR_ENV} to the "
            f"folder holding {relative}"
        )
    return path


def load_json_rows(path: pathlib.Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines or JSON-array file (a file starting with `[` is an array).

    Every problem is a DataFileError naming the file, the line (1-based) and what is wrong:
    an empty file, a line that is not JSON, a row that is not an object or has no fields.
    """
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataFileError(f"{path} is empty: it holds no records; point to a file with data")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        located = [(f"element {i}", row) for i, row in enumerate(rows)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataFileError(
                    f"{path} line {lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
    for place, row in located:
        check_row(path, place, row)
    return [row for _, row in located]


def check_row(path: pathlib.Path, place: str, row: Any) -> None:
    """Raise DataFileError unless `row` (at `place`, e.g. "line 3", of `path`) is a non-empty
    JSON object."""
    if not isinstance(row, dict):
        raise DataFileError(
            f"{path} {place}: a JSON {type(row).__name__}, expected an object of fields"
        )
    if not row:
        raise DataFileError(f"{path} {place}: an empty object {{}}, the record has no fields")


def load_table_rows(path: pathlib.Path) -> list[dict[str, Any]]:
    """Rows of a Parquet (`.parquet`) or JSON-lines / JSON-array file, read with `datasets`."""
    if path.suffix != ".parquet":
        return load_json_rows(path)
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return [dict(row) for row in ds]


def require(row: dict[str, Any], field: str, kind: type | tuple[type, ...], where: str) -> Any:
    """row[field], checked to be an instance of `kind`; `where` names file and index."""
    value = row.get(field)
    if value is None:
        raise RecordError(f"{where}: missing field {field!r}")
    # bool is an int subclass; a True where an int belongs is a data bug, not a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordError(
            f"{where}: field {field!r} must be {want}, got {type(value).__name__} "
            f"({str(value)[:60]!r})"
        )
    return value


def where(path: pathlib.Path, index: int) -> str:
    """Location string used in every RecordError."""
    return f"{path} record {index}"


def chat(system: str | None, user: str) -> list[dict[str, str]]:
    """Chat messages: an optional system message, then the user message."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return [*msgs, {"role": "user", "content": user}]


def clip_text(text: str, limit: int = 200) -> str:
    """Shorten text for feedback messages (the answer may be a 1 MB ramble)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


FEEDBACK_STYLES = ("rich", "sdpo")  # "rich": name what was wrong; "sdpo": the paper's own text


def check_feedback_style(feedback_style: str) -> str:
    """Validate a task's `feedback_style` argument (shared by every verifier with feedback)."""
    if feedback_style not in FEEDBACK_STYLES:
        raise ValueError(f"feedback_style={feedback_style!r}; use one of {FEEDBACK_STYLES}")
    return feedback_style
