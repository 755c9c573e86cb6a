"""SciKnowEval L3 multiple-choice QA in SDPO's format (data: sciknoweval/<domain>/<split>.json)."""

from __future__ import annotations

import os
from typing import Any

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

DOMAINS = ("biology", "chemistry", "material", "physics")
LETTERS = ("A", "B", "C", "D")

# SDPO's data/format/sciknoweval.py system prompt; records carry it, this is the fallback.
SYSTEM_PROMPT = """
Given a question and four options, please select the right answer. Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>

For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate the answer text. For example, if the answer is "A", just output:
<answer>
A
</answer>
"""  # noqa: E501


def extract_mcq_answer(response: str) -> str:
    """Text after the last `<answer>`, cut at the next `</answer>`, stripped (SDPO mcq.py)."""
    start = response.rfind("<answer>")
    tail = response if start < 0 else response[start + len("<answer>") :]
    end = tail.find("</answer>")
    return (tail if end < 0 else tail[:end]).strip()


def mcq_feedback(response: str, extracted: str, answer: str) -> str | None:
    """Feedback for a wrong MCQ response; never reveals the right letter."""
    if extracted == answer:
        return None
    if "<answer>" not in response:
        return (
            "Your response had no <answer></answer> tag. End with <answer>\nX\n</answer> "
            "where X is one of A, B, C or D."
        )
    if extracted not in LETTERS:
        return (
            f"Your answer {clip_text(extracted, 80)!r} is not a single option letter; "
            "answer with exactly one of A, B, C or D."
        )
    return f"The answer {extracted} is incorrect."


class SciKnowEvalTask:
    """SciKnowEval MCQ; `domain=None` concatenates all four domains."""

    def __init__(self, domain: str | None = None, feedback_style: str = "rich") -> None:
        if domain is not None and domain not in DOMAINS:
            raise ValueError(f"unknown SciKnowEval domain {domain!r}; use one of {DOMAINS}")
        check_feedback_style(feedback_style)
        self.domain = domain
        self.feedback_style = feedback_style
        self.name = "sciknoweval" if domain is None else f"sciknoweval_{domain}"

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Validated records of `split` ("train" or "test")."""
        if split not in ("train", "test"):
            raise ValueError(f"{self.name}: split {split!r} does not exist; use 'train' or 'test'")
        domains = DOMAINS if self.domain is None else (self.domain,)
        records = []
        for domain in domains:
            path = resolve_data_file(data_dir, f"sciknoweval/{domain}/{split}.json")
            for i, row in enumerate(load_json_rows(path)):
                records.append(_science_record(row, where(path, i), domain))
        return records

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """SDPO's chat: the record's system prompt, then the question with options."""
        return chat(record["system"], record["prompt"])

    def verify(self, response: str, record: dict[str, Any]) -> Verdict:
        """Reward 1 iff the last `<answer>` content equals the letter (SDPO mcq.py)."""
        extracted = extract_mcq_answer(response)
        reward = float(extracted == record["answer"])
        # SDPO's mcq reward returns empty feedback, so its teacher never sees any for MCQ.
        feedback = None
        if self.feedback_style == "rich":
            feedback = mcq_feedback(response, extracted, record["answer"])
        return Verdict(reward=reward, feedback=feedback, extracted=extracted)


def _science_record(row: dict[str, Any], loc: str, domain: str) -> dict[str, Any]:
    answer = require(row, "answer", str, loc)
    if answer not in LETTERS:
        raise RecordError(f"{loc}: field 'answer' must be one of {LETTERS}, got {answer!r}")
    system = row.get("system")
    if system is not None:
        system = require(row, "system", str, loc)
    return {
        "id": f"sciknoweval/{domain}/{require(row, 'idx', int, loc)}",
        "system": SYSTEM_PROMPT if system is None else system,
        "prompt": require(row, "prompt", str, loc),
        "answer": answer,
        "domain": domain,
    }


_PARAMS = ("feedback_style",)
register_task("sciknoweval", lambda **kw: SciKnowEvalTask(None, **kw), params=_PARAMS)
for _domain in DOMAINS:
    register_task(
        f"sciknoweval_{_domain}", lambda _d=_domain, **kw: SciKnowEvalTask(_d, **kw), params=_PARAMS
    )
