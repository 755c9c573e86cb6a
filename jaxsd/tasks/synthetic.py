"""Offline tasks a tiny model can learn on a CPU: short arithmetic and generated tool calls.

Splits come from one seeded generator: the first `test_size` distinct problems form "test",
the next `train_size` form "train", so the splits are disjoint and identical for a seed.
Prompts and answers stay within tens of tokens (the tiny model has a ~1k BPE vocabulary).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any

from jaxsd.tasks.base import Verdict, chat, clip_text, register_task
from jaxsd.tasks.math import extract_math_answer, normalize_answer
from jaxsd.tasks.science import extract_mcq_answer
from jaxsd.tasks.tool_use import verify_tool_calls

ARITHMETIC_SYSTEM = "Answer with <answer>number</answer>."
TOOL_SYSTEM = "Reply with Action: tool and Action Input: JSON."

_VERBS = ("get", "find", "list", "set", "add", "send", "play", "book")
_NOUNS = ("Weather", "Song", "User", "Order", "Movie", "Flight", "Note", "Photo", "Book", "Team")
_STR_PARAMS = ("city", "name", "genre", "color", "tag")
_INT_PARAMS = ("id", "limit", "day", "year")
_WORDS = ("paris", "rome", "jazz", "rock", "red", "blue", "anna", "bob", "kyoto", "lima")


def _split(
    make: Callable[[random.Random], dict[str, Any]], seed: int, sizes: dict[str, int]
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic disjoint splits of distinct problems (distinct by prompt)."""
    total = sum(sizes.values())
    rng = random.Random(seed)
    seen: set[str] = set()
    problems = []
    draws = 0
    while len(problems) < total:
        draws += 1
        if draws > 50 * total + 1000:  # the configuration has fewer distinct problems
            raise ValueError(
                f"could only generate {len(problems)} distinct problems of {total} asked "
                f"({sizes}); lower train_size/test_size or enlarge the problem space"
            )
        record = make(rng)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            problems.append(record)
    out, start = {}, 0
    for split, size in sizes.items():
        out[split] = [
            {**r, "id": f"{split}/{k}"} for k, r in enumerate(problems[start : start + size])
        ]
        start += size
    return out


def _check_sizes(train_size: int, test_size: int) -> None:
    for key, size in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{key}={size!r} must be an integer >= 1 (a split needs questions)")


class ArithmeticTask:
    """`a+b` / `a-b` with operands below 10**digits; answer in <answer></answer> or \\boxed{}."""

    def __init__(
        self, seed: int = 0, digits: int = 2, train_size: int = 2000, test_size: int = 200
    ) -> None:
        if digits < 1:
            raise ValueError(f"digits={digits} must be >= 1")
        _check_sizes(train_size, test_size)
        self.name = "arithmetic"
        self.seed, self.digits = seed, digits
        self._sizes = {"test": test_size, "train": train_size}
        self._splits: dict[str, list[dict[str, Any]]] | None = None

    def _make(self, rng: random.Random) -> dict[str, Any]:
        hi = 10**self.digits - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        return {"system": ARITHMETIC_SYSTEM, "prompt": f"{a}{op}{b}=?", "answer": str(value)}

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Generated records of `split` ("train" or "test"); `data_dir` is unused."""
        if split not in self._sizes:
            raise ValueError(f"arithmetic: split {split!r}; use 'train' or 'test'")
        if self._splits is None:
            self._splits = _split(self._make, self.seed, self._sizes)
        return [dict(r) for r in self._splits[split]]

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """A one-line system instruction and the bare expression."""
        return chat(record["system"], record["prompt"])

    def verify(self, response: str, record: dict[str, Any]) -> Verdict:
        """Reward 1 iff the last <answer> (or \\boxed{}) holds the right integer."""
        predicted = extract_math_answer(response)
        if predicted is None and "<answer>" in response:
            predicted = extract_mcq_answer(response)
        if predicted is None:
            feedback = "Give the result as <answer>number</answer>."
            return Verdict(reward=0.0, feedback=feedback, extracted=None)
        extracted = normalize_answer(predicted)
        correct = extracted == record["answer"]
        feedback = None if correct else f"The answer {clip_text(predicted, 40)} is incorrect."
        return Verdict(reward=float(correct), feedback=feedback, extracted=extracted)


class ToolCallTask:
    """Generated ToolAlpaca-format calls: pick the tool named by the request, fill its args."""

    def __init__(
        self, seed: int = 0, n_tools: int = 2, train_size: int = 2000, test_size: int = 200
    ) -> None:
        if not 1 <= n_tools <= len(_VERBS):
            raise ValueError(f"n_tools={n_tools} must be in [1, {len(_VERBS)}]")
        _check_sizes(train_size, test_size)
        self.name = "tool_call"
        self.seed, self.n_tools = seed, n_tools
        self._sizes = {"test": test_size, "train": train_size}
        self._splits: dict[str, list[dict[str, Any]]] | None = None

    def _make(self, rng: random.Random) -> dict[str, Any]:
        verbs = rng.sample(_VERBS, self.n_tools)
        tools = []
        for verb in verbs:
            params = [rng.choice(_STR_PARAMS)]
            if rng.random() < 0.5:
                params.append(rng.choice(_INT_PARAMS))
            tools.append((verb, rng.choice(_NOUNS), params))
        verb, noun, params = rng.choice(tools)
        args = {p: rng.choice(_WORDS) if p in _STR_PARAMS else rng.randint(1, 9) for p in params}
        listing = " ".join(f"{v}{n}({','.join(ps)})" for v, n, ps in tools)
        # The request spells the tool's words ("get weather"), so the name must be inferred.
        request = " ".join([verb, noun.lower(), *(f"{k} {v}" for k, v in args.items())])
        golden = [{"Action": verb + noun, "Action_Input": json.dumps(args)}]
        return {
            "system": TOOL_SYSTEM,
            "prompt": f"Tools: {listing}\n{request}",
            "answer": json.dumps(golden),
        }

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Generated records of `split` ("train" or "test"); `data_dir` is unused."""
        if split not in self._sizes:
            raise ValueError(f"tool_call: split {split!r}; use 'train' or 'test'")
        if self._splits is None:
            self._splits = _split(self._make, self.seed, self._sizes)
        return [dict(r) for r in self._splits[split]]

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """A one-line format instruction, the tool list and the request."""
        return chat(record["system"], record["prompt"])

    def verify(self, response: str, record: dict[str, Any]) -> Verdict:
        """The SDPO tool-use verifier with rich feedback."""
        return verify_tool_calls(response, record["answer"], "rich")


register_task("arithmetic", ArithmeticTask)
register_task("tool_call", ToolCallTask)
