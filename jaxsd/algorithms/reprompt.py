"""SDPO reprompt chat (METHODS §1) used by the algorithms' teacher contexts.

TEMPORARY home: jaxsd/tasks/reprompt.py owns the template; this module follows the same §1
text and is replaced by an import once that lands (one template, one place).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Message = dict[str, str]

_THINK_RE = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
SOLUTION_SECTION = "\nCorrect solution:\n\n{successful_previous_attempt}\n"
FEEDBACK_SECTION = (
    "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n"
)
REPROMPT = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."


def strip_think(text: str) -> str:
    """Remove `<think>…</think>` blocks from a solution before it enters a reprompt."""
    return _THINK_RE.sub("", text).strip()


def sdpo_reprompt_messages(
    prompt: Sequence[Message], *, solution: str | None, feedback: str | None
) -> list[Message]:
    """Teacher chat for SDPO, METHODS §1: system messages kept, the user turn reprompted."""
    system = [dict(m) for m in prompt if m["role"] == "system"]
    users = [m for m in prompt if m["role"] == "user"]
    if len(users) != 1 or len(system) + 1 != len(prompt):
        raise ValueError(
            "the SDPO reprompt expects a single-turn prompt (system messages + one user "
            f"message), got roles {[m['role'] for m in prompt]}"
        )
    text = REPROMPT.format(
        prompt=users[0]["content"],
        solution=SOLUTION_SECTION.format(successful_previous_attempt=strip_think(solution))
        if solution
        else "",
        feedback=FEEDBACK_SECTION.format(feedback_raw=feedback) if feedback else "",
    )
    return [*system, {"role": "user", "content": text}]


def ssopd_privileged_messages(prompt: Sequence[Message], *, reference: str) -> list[Message]:
    """SSOPD teacher chat, METHODS §6: the prompt with the correct rollout y⁺ as privileged
    context (the §1 reprompt with its solution section, no feedback)."""
    return sdpo_reprompt_messages(prompt, solution=reference, feedback=None)
