"""ToolAlpaca tool use in SDPO's format: Thought / Action / Action Input, verified against the
golden action multiset and merged golden inputs (SDPO reward_score/feedback/tooluse.py).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
from collections import Counter
from typing import Any

from jaxsd.tasks.base import (
    DATA_DIR_ENV,
    RecordError,
    Verdict,
    chat,
    check_feedback_style,
    clip_text,
    default_data_dir,
    load_json_rows,
    register_task,
    require,
    resolve_data_file,
    where,
)

# SDPO's datasets/tooluse prompt, rebuilt from ToolAlpaca fields ("NLDocumentation" ends in "\n").
TOOL_PROMPT = (
    "Your task is to answer the user's question using available tools. \n"
    "You have access to the following tools:\n"
    "Name: {name}\nDescription: {description}\nDocumentation:\n{documentation}\n"
    "Use the following format:\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of the tool names.\n"
    "Action Input: the input to the action, must be in JSON format. "
    "All of the action input must be realistic and from the user.\n\n"
    "Begin!\nQuestion: {question}"
)

# `\s*` and `\w+` are disjoint classes, so this cannot backtrack more than linearly.
_ACTION_RE = re.compile(r"Action:\s*(\w+)")
_INPUT_TAG = "Action Input:"
_SPACES_RE = re.compile(r"\s*")
_MAX_LISTED = 10

# Training splits: not in the shared data (only the evaluation files are); file and public source.
TRAIN_FILES = {
    "sdpo": (
        "sdpo_tooluse/train.json",
        "https://github.com/lasgroup/SDPO (datasets/tooluse/train.json, SDPO's training rows "
        "built from ToolAlpaca)",
    ),
    "toolalpaca": (
        "toolalpaca/train_data.json",
        "https://github.com/tangqiaoyu/ToolAlpaca (data/train_data.json)",
    ),
}


def parse_actions(text: str) -> list[str]:
    """Every word after an `Action:` marker, in order (SDPO `extract_actions`)."""
    return _ACTION_RE.findall(text)


def parse_action_inputs(text: str) -> dict[str, Any]:
    """Merge of the JSON objects after `Action Input:` (SDPO `extract_action_inputs`).

    Same matches as SDPO's `re.findall(r'Action Input:\\s*({.*?})', text, re.DOTALL)` —
    a block runs from `{` to the FIRST `}`, so nested objects never parse — but scanned with
    str.find: the lazy regex rescans to the end of the text for every unclosed block,
    which is quadratic on adversarial input.
    """
    merged: dict[str, Any] = {}
    pos = 0
    while True:
        tag = text.find(_INPUT_TAG, pos)
        if tag < 0:
            return merged
        start = _SPACES_RE.match(text, tag + len(_INPUT_TAG)).end()
        if start >= len(text) or text[start] != "{":
            pos = tag + 1
            continue
        end = text.find("}", start)
        if end < 0:  # no later block can close either
            return merged
        try:
            block = json.loads(text[start : end + 1])
        except (ValueError, RecursionError):
            block = None
        if isinstance(block, dict):
            merged.update(block)
        pos = end + 1


@functools.lru_cache(maxsize=4096)
def parse_golden(answer: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Golden action names and their merged inputs from a record's `answer` JSON string."""
    steps = json.loads(answer)
    actions, merged = [], {}
    for step in steps:
        actions.append(step["Action"])
        raw = step["Action_Input"]
        try:
            parsed = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            parsed = {}
        if isinstance(parsed, dict):
            merged.update(parsed)
    return tuple(actions), merged


def _names(counter: Counter) -> str:
    items = [clip_text(n, 60) for n in sorted(counter.elements())]
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _dump(value: Any) -> str:
    return clip_text(json.dumps(value, ensure_ascii=False), 120)


def rich_tool_feedback(
    pred_actions: list[str],
    pred_inputs: dict[str, Any],
    gold_actions: tuple[str, ...],
    gold_inputs: dict[str, Any],
) -> str | None:
    """Feedback naming each difference: wrong/missing/extra actions and parameters."""
    parts = []
    missing = Counter(gold_actions) - Counter(pred_actions)
    extra = Counter(pred_actions) - Counter(gold_actions)
    if not pred_actions:
        parts.append(
            f"No 'Action:' line was found; expected action {_names(missing)}. Reply with "
            "'Action: <tool name>' and 'Action Input: <JSON object>'."
        )
    elif sum(missing.values()) == 1 and sum(extra.values()) == 1:
        parts.append(f"Expected action {_names(missing)}, got {_names(extra)}.")
    else:
        if missing:
            parts.append(f"Missing action(s): {_names(missing)}.")
        if extra:
            parts.append(f"Unexpected action(s): {_names(extra)}.")
    if pred_inputs != gold_inputs:
        if not pred_inputs and gold_inputs:
            parts.append("No parseable JSON object followed 'Action Input:'.")
        for key, value in gold_inputs.items():
            if key not in pred_inputs:
                parts.append(f"Missing parameter {key!r} (expected {_dump(value)}).")
            elif pred_inputs[key] != value:
                parts.append(
                    f"Wrong value for parameter {key!r}: expected {_dump(value)}, "
                    f"got {_dump(pred_inputs[key])}."
                )
        unexpected = [k for k in pred_inputs if k not in gold_inputs]
        if unexpected:
            parts.append(f"Unexpected parameter(s): {_names(Counter(unexpected))}.")
    return " ".join(parts) if parts else None


def sdpo_tool_feedback(
    pred_actions: list[str],
    pred_inputs: dict[str, Any],
    gold_actions: tuple[str, ...],
    gold_inputs: dict[str, Any],
) -> str | None:
    """SDPO's own feedback strings (tooluse.py), for exact reproduction."""
    parts = []
    if Counter(pred_actions) != Counter(gold_actions):
        parts.append(f"Actions mismatch: predicted {pred_actions}, expected {list(gold_actions)}")
    if pred_inputs != gold_inputs:
        parts.append(f"Action inputs mismatch: predicted {pred_inputs}, expected {gold_inputs}")
    return "; ".join(parts) if parts else None


def verify_tool_calls(response: str, answer: str, feedback_style: str = "rich") -> Verdict:
    """Reward 1 iff action multisets match and merged inputs are equal (SDPO tooluse)."""
    gold_actions, gold_inputs = parse_golden(answer)
    pred_actions = parse_actions(response)
    pred_inputs = parse_action_inputs(response)
    correct = Counter(pred_actions) == Counter(gold_actions) and pred_inputs == gold_inputs
    style = rich_tool_feedback if feedback_style == "rich" else sdpo_tool_feedback
    feedback = None if correct else style(pred_actions, pred_inputs, gold_actions, gold_inputs)
    extracted = json.dumps(
        {"actions": sorted(pred_actions), "inputs": pred_inputs}, sort_keys=True, default=str
    )
    return Verdict(reward=float(correct), feedback=feedback, extracted=extracted)


def validate_golden(answer: str, loc: str) -> None:
    """Raise RecordError unless `answer` is a JSON list of {Action: str, Action_Input: ...}."""
    try:
        steps = json.loads(answer)
    except ValueError as err:
        raise RecordError(f"{loc}: field 'answer' is not valid JSON ({err})") from err
    if not isinstance(steps, list) or not steps:
        raise RecordError(f"{loc}: field 'answer' must be a non-empty JSON list of steps")
    for k, step in enumerate(steps):
        if not isinstance(step, dict):
            raise RecordError(f"{loc}: field 'answer' step {k} must be an object")
        require(step, "Action", str, f"{loc} answer step {k}")
        require(step, "Action_Input", (str, dict), f"{loc} answer step {k}")


class ToolUseTask:
    """Tool use. source="sdpo": SDPO's rows (sdpo_tooluse/<split>.json, split "test" ships);
    source="toolalpaca": ToolAlpaca's eval files (splits "eval_simulated", "eval_real")."""

    def __init__(self, source: str = "sdpo", feedback_style: str = "rich") -> None:
        if source not in ("sdpo", "toolalpaca"):
            raise ValueError(f"source={source!r}; use 'sdpo' or 'toolalpaca'")
        check_feedback_style(feedback_style)
        self.source = source
        self.feedback_style = feedback_style
        self.name = "tooluse" if source == "sdpo" else "toolalpaca"

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Validated records of `split` ("train" needs a file that is not shipped offline)."""
        if split == "train":
            self._require_train_file(data_dir)
        if self.source == "sdpo":
            path = resolve_data_file(data_dir, f"sdpo_tooluse/{split}.json")
            return [_sdpo_record(row, where(path, i)) for i, row in enumerate(load_json_rows(path))]
        if split not in ("train", "eval_simulated", "eval_real"):
            raise ValueError(
                f"toolalpaca: split {split!r}; use 'train', 'eval_simulated' or 'eval_real'"
            )
        rel = TRAIN_FILES["toolalpaca"][0] if split == "train" else f"toolalpaca/{split}.json"
        path = resolve_data_file(data_dir, rel)
        records = []
        for i, api in enumerate(load_json_rows(path)):
            records.extend(_toolalpaca_records(api, where(path, i), f"toolalpaca/{split}/{i}"))
        return records

    def _require_train_file(self, data_dir: str | os.PathLike | None) -> None:
        """Fail, naming the file and where to get it, when the training split is absent."""
        rel, source = TRAIN_FILES[self.source]
        root = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
        if not (root / rel).is_file():
            raise FileNotFoundError(
                f"{self.name}: split 'train' needs {root / rel}, which does not exist: the "
                f"tool-use training split is not part of the offline data (only its evaluation "
                f"files are). Download it from {source}, save it as {root / rel}, or point "
                f"${DATA_DIR_ENV} (or --config.task.data_dir) at a folder holding {rel}."
            )

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """SDPO's chat for tool use: no system message, the whole prompt as the user turn."""
        return chat(record["system"], record["prompt"])

    def verify(self, response: str, record: dict[str, Any]) -> Verdict:
        """SDPO tool-use reward with feedback naming what differs."""
        return verify_tool_calls(response, record["answer"], self.feedback_style)


def _sdpo_record(row: dict[str, Any], loc: str) -> dict[str, Any]:
    answer = require(row, "answer", str, loc)
    validate_golden(answer, loc)
    system = row.get("system")
    return {
        "id": f"tooluse/{require(row, 'idx', int, loc)}",
        "system": None if system is None else require(row, "system", str, loc),
        "prompt": require(row, "prompt", str, loc),
        "answer": answer,
    }


def _toolalpaca_records(api: dict[str, Any], loc: str, prefix: str) -> list[dict[str, Any]]:
    questions = require(api, "Instructions", list, loc)
    golden = require(api, "Golden_Answers", list, loc)
    if len(questions) != len(golden):
        raise RecordError(
            f"{loc}: fields 'Instructions' ({len(questions)}) and 'Golden_Answers' "
            f"({len(golden)}) must have the same length"
        )
    fields = {
        "name": require(api, "Name", str, loc),
        "description": require(api, "Description", str, loc),
        "documentation": require(api, "NLDocumentation", str, loc),
    }
    records = []
    for k, (question, steps) in enumerate(zip(questions, golden, strict=True)):
        if not isinstance(question, str):
            raise RecordError(f"{loc}: field 'Instructions' item {k} must be str")
        answer = json.dumps(steps)
        validate_golden(answer, f"{loc} field 'Golden_Answers' item {k}")
        records.append(
            {
                "id": f"{prefix}/{k}",
                "system": None,
                "prompt": TOOL_PROMPT.format(question=question, **fields),
                "answer": answer,
            }
        )
    return records


_PARAMS = ("feedback_style",)
register_task("tooluse", lambda **kw: ToolUseTask("sdpo", **kw), params=_PARAMS)
register_task("toolalpaca", lambda **kw: ToolUseTask("toolalpaca", **kw), params=_PARAMS)
