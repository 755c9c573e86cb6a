"""Math word problems (GSM8K, MATH-500, AIME, HMMT): final answer in \\boxed{} (GSM8K also
`#### x`). GSM8K compares normalised numbers only (fast, exact); MATH-500 / AIME / HMMT fall
back to `math-verify` (symbolic: `2√2` = `\\sqrt{8}`, `{1,2}` = `{2,1}`) in worker processes
with a hard per-answer timeout (jaxsd.tasks.equivalence), so no answer can hang the trainer.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import warnings
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from jaxsd.tasks import equivalence
from jaxsd.tasks.base import (
    RecordError,
    Verdict,
    chat,
    check_feedback_style,
    clip_text,
    load_json_rows,
    register_task,
    require,
    resolve_data_file,
    where,
)

# SDPO data/format/prompts.py PROMPT.
MATH_PROMPT = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
# SDPO feedback/math.py format feedback (the only math feedback SDPO turns on by default).
FORMAT_FEEDBACK = (
    "Your answer had the wrong format. The solution must be given in the format: "
    "\\boxed{your_answer}."
)
# Longer answers skip numeric parsing (int() of 10^5 digits is slow and capped in 3.11).
_MAX_NUMERIC_CHARS = 100

_BRACES_RE = re.compile(r"[{}]")
_GSM_NUMBER_RE = re.compile(r"\s*([-+]?)\$?([-+]?[\d,]*\.?\d+)")
_SPACING_RE = re.compile(r"\\[!,;: ]|\\(?:left|right|displaystyle)(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\{?\\circ\}?|°|\\%|%|\\\$|\$")
_UNIT_RE = re.compile(r"\\(?:text|mbox)\{\s[^{}]*\}$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_WS_RE = re.compile(r"\s+")
_FRAC_DIGITS_RE = re.compile(r"\\frac(\d)(\d)")
_FRAC_DIGIT_DEN_RE = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_FRAC_DIGIT_NUM_RE = re.compile(r"\\frac(\d)\{")
_SQRT_RE = re.compile(r"\\sqrt([0-9a-zA-Z])")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_FRAC_RE = re.compile(r"([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}")
_SLASH_RE = re.compile(r"([-+]?\d+)/([-+]?\d+)")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (braces matched); None if absent
    or unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    open_at = text.index("{", start)
    depth = 0
    for m in _BRACES_RE.finditer(text, open_at):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[open_at + 1 : m.start()]
    return None


def gsm8k_final(text: str) -> str | None:
    """The number after the last `####` (GSM8K's answer marker), or None."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    m = _GSM_NUMBER_RE.match(text, idx + 4)
    return None if m is None else m.group(1) + m.group(2)


def extract_math_answer(response: str, allow_hashes: bool = False) -> str | None:
    """Final answer: the last \\boxed{}; with `allow_hashes`, a later `#### x` wins."""
    boxed = last_boxed(response)
    if allow_hashes and response.rfind("####") > response.rfind("\\boxed"):
        hashed = gsm8k_final(response)
        if hashed is not None:
            return hashed
    return boxed


def _rational(s: str) -> Fraction | None:
    if len(s) > _MAX_NUMERIC_CHARS:
        return None
    if _DECIMAL_RE.fullmatch(s):
        return Fraction(s)
    if m := _FRAC_RE.fullmatch(s):
        num, den = int(m.group(2)), int(m.group(3))
        return None if den == 0 else Fraction(num, den) * (-1 if m.group(1) == "-" else 1)
    if m := _SLASH_RE.fullmatch(s):
        num, den = int(m.group(1)), int(m.group(2))
        return None if den == 0 else Fraction(num, den)
    return None


@functools.lru_cache(maxsize=65536)
def normalize_answer(answer: str) -> str:
    """Canonical form: LaTeX spacing/units/text removed, fractions braced, numbers as
    reduced rationals ("0.5", "\\frac{1}{2}", "1/2" -> "1/2"; "025" -> "25"; "2,125" -> "2125")."""
    s = answer.strip().replace("\n", "")
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s)
    s = _UNIT_RE.sub("", s.rstrip())
    s = _TEXT_RE.sub(r"\1", s)
    s = _WS_RE.sub("", s)
    s = _FRAC_DIGITS_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_DIGIT_DEN_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_DIGIT_NUM_RE.sub(r"\\frac{\1}{", s)
    s = _SQRT_RE.sub(r"\\sqrt{\1}", s)
    lhs, eq, rhs = s.partition("=")
    if eq and len(lhs) <= 2 and "=" not in rhs:  # "x=5" -> "5"
        s = rhs
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    value = _rational(s)
    if value is None:
        return s
    return (
        str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    )


_RATIONAL_RE = re.compile(r"-?\d+(?:/\d+)?")
EQUIVALENCES = ("normalise", "math_verify")


def answers_match(predicted: str, gold: str) -> bool:
    """Equality after `normalize_answer`."""
    return normalize_answer(predicted) == normalize_answer(gold)


# task name -> split -> (file, problem field, answer field, id field or None)
_SOURCES: dict[str, dict[str, tuple[str, str, str, str | None]]] = {
    "gsm8k": {
        "train": ("gsm8k/train.jsonl", "question", "answer", None),
        "test": ("gsm8k/test.jsonl", "question", "answer", None),
    },
    "math500": {
        "test": ("math/test/math.json", "problem", "answer", "unique_id"),
        "train": ("math/train/math.json", "problem", "answer", None),
    },
    "aime": {
        "test": ("aime/rllm/test/aime.json", "problem", "answer", None),
        "train": ("aime/rllm/train/aime.json", "problem", "answer", None),
        "2024": ("matharena/derived/aime_2024.jsonl", "problem", "answer", "id"),
        "2025": ("matharena/derived/aime_2025.jsonl", "problem", "answer", "id"),
    },
    "hmmt": {"test": ("matharena/derived/hmmt_feb_2025.jsonl", "problem", "answer", "id")},
}
# Splits known to hold a few rows without a gold answer (rllm's MATH train: 2 of 7474), which
# no verifier can score: they are left out with a warning naming them; elsewhere it is an error.
_UNANSWERED_ROWS_OK = {("math500", "train")}
# Mixtures: task name -> split -> the (task, split) parts, concatenated. math_aime is SSOPD's
# offline training set (MATH train + AIME 1983-2023; the paper's OpenThoughts math subset is
# not in the shared data); its test split is AIME 2024.
_MIXES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "math_aime": {"train": (("math500", "train"), ("aime", "train")), "test": (("aime", "test"),)},
}


class MathTask:
    """Math with a boxed final answer; GSM8K gold answers are the number after `####`."""

    def __init__(
        self,
        name: str,
        feedback_style: str = "rich",
        equivalence: str | None = None,
        verify_timeout_s: float = 5.0,
        verify_workers: int = 2,
    ) -> None:
        """`equivalence`: "normalise" (string/number match, GSM8K's default) or "math_verify"
        (then symbolic, the default of the others), each answer within `verify_timeout_s` on
        `verify_workers` processes."""
        if name not in _SOURCES and name not in _MIXES:
            raise ValueError(
                f"unknown math task {name!r}; use one of {sorted(_SOURCES) + sorted(_MIXES)}"
            )
        check_feedback_style(feedback_style)
        equivalence = equivalence or ("normalise" if name == "gsm8k" else "math_verify")
        if equivalence not in EQUIVALENCES:
            raise ValueError(f"equivalence={equivalence!r}; use one of {EQUIVALENCES}")
        if not (verify_timeout_s > 0 and verify_workers >= 1):
            raise ValueError(
                f"verify_timeout_s={verify_timeout_s} must be > 0 and verify_workers="
                f"{verify_workers} >= 1"
            )
        self.name = name
        self.feedback_style = feedback_style
        self.equivalence = equivalence
        self.verify_timeout_s = float(verify_timeout_s)
        self.verify_workers = int(verify_workers)

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Validated records of `split` (see `_SOURCES` for the files, `_MIXES` for mixtures)."""
        splits = _MIXES.get(self.name) or _SOURCES[self.name]
        if split not in splits:
            raise ValueError(
                f"{self.name}: split {split!r} does not exist; use one of {sorted(splits)}"
            )
        if self.name in _MIXES:
            return [
                record
                for part, part_split in _MIXES[self.name][split]
                for record in MathTask(part, self.feedback_style).load(part_split, data_dir)
            ]
        rel, problem_key, answer_key, id_key = _SOURCES[self.name][split]
        path = resolve_data_file(data_dir, rel)
        records, unanswered = [], []
        for i, row in enumerate(load_json_rows(path)):
            loc = where(path, i)
            problem = require(row, problem_key, str, loc)
            if row.get(answer_key) is None and (self.name, split) in _UNANSWERED_ROWS_OK:
                unanswered.append(i)
                continue
            answer = require(row, answer_key, str, loc)
            if self.name == "gsm8k":
                final = gsm8k_final(answer)
                if final is None:
                    raise RecordError(f"{loc}: field {answer_key!r} has no '#### <number>' line")
                answer = normalize_answer(final)
            rid = require(row, id_key, str, loc) if id_key else str(i)
            records.append(
                {
                    "id": f"{self.name}/{split}/{rid}",
                    "system": None,
                    "prompt": MATH_PROMPT.format(problem=problem),
                    "answer": answer,
                    "problem": problem,
                }
            )
        if unanswered:
            warnings.warn(
                f"{path}: {len(unanswered)} rows have no {answer_key!r} and are left out of "
                f"{self.name}/{split} (row indices {unanswered[:10]})",
                stacklevel=2,
            )
        return records

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """SDPO's math chat: one user turn asking for a boxed answer."""
        return chat(record["system"], record["prompt"])

    def verify(self, response: str, record: dict[str, Any]) -> Verdict:
        """Reward 1 iff the extracted final answer equals the gold one (see `verify_many`)."""
        return self.verify_many([response], [record])[0]

    def verify_many(
        self, responses: Sequence[str], records: Sequence[dict[str, Any]]
    ) -> list[Verdict]:
        """Verdicts of many responses; the symbolic comparisons run side by side."""
        predicted = [extract_math_answer(r, allow_hashes=self.name == "gsm8k") for r in responses]
        extracted = [None if p is None else normalize_answer(p) for p in predicted]
        golds = [normalize_answer(r["answer"]) for r in records]
        correct = [e is not None and e == g for e, g in zip(extracted, golds, strict=True)]
        # Two different plain numbers are different; anything else may be equal symbolically.
        hard = [
            i for i, (e, g) in enumerate(zip(extracted, golds, strict=True))
            if e is not None and not correct[i] and self.equivalence == "math_verify"
            and not (_RATIONAL_RE.fullmatch(e) and _RATIONAL_RE.fullmatch(g))
        ]  # fmt: skip
        if hard:
            pool = equivalence.shared_pool(self.verify_workers, self.verify_timeout_s)
            pairs = [(predicted[i], str(records[i]["answer"])) for i in hard]
            for i, same in zip(hard, pool.equal_many(pairs), strict=True):
                correct[i] = same
        return [
            self._verdict(p, e, ok) for p, e, ok in zip(predicted, extracted, correct, strict=True)
        ]

    def _verdict(self, predicted: str | None, extracted: str | None, correct: bool) -> Verdict:
        if predicted is None:
            return Verdict(reward=0.0, feedback=FORMAT_FEEDBACK, extracted=None)
        feedback = None
        if not correct and self.feedback_style == "rich":
            feedback = f"The answer {clip_text(predicted.strip(), 120)} is incorrect."
        return Verdict(reward=float(correct), feedback=feedback, extracted=extracted)


# The factory's **kw hides MathTask's own keyword arguments from task-kwargs validation.
_MATH_TASK_PARAMS = tuple(p for p in inspect.signature(MathTask).parameters if p != "name")
for _name in (*_SOURCES, *_MIXES):
    register_task(_name, lambda _n=_name, **kw: MathTask(_n, **kw), params=_MATH_TASK_PARAMS)
