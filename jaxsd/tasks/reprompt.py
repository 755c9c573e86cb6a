"""Teacher contexts: SDPO's reprompt (METHODS §1) and SSOPD's privileged context (METHODS §6)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# METHODS §1, exact. (SDPO's actor.yaml writes the two sections without the trailing "\n";
# its dataclass defaults use "\n\n". METHODS is our contract.)
REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}\n"
FEEDBACK_TEMPLATE = (
    "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n"
)
MAX_REPROMPT_TOKENS = 10240
_SPACES_RE = re.compile(r"\s*")
SUCCESS_THRESHOLD = 0.5  # SDPO actor.yaml success_reward_threshold; METHODS τ_succ

CORRECT_SIDES = ("shortest", "longest", "max-logp", "min-logp")
WRONG_SIDES = ("longest", "shortest", "min-logp")


@dataclass(frozen=True)
class TeacherPrompt:
    """Teacher chat messages for one rollout; `sd_mask` 0.0 means "do not distil it"."""

    messages: list[dict[str, str]]
    sd_mask: float
    used_solution: bool
    used_feedback: bool


def strip_thinking(text: str) -> str:
    """Remove every `<think>…</think>` and the whitespace after it (SDPO `_remove_thinking_trace`).

    Same result as `re.sub(r'<think>.*?</think>\\s*', '', text, flags=re.DOTALL)`, with a
    find loop because the lazy regex rescans the whole tail for each unclosed `<think>`.
    """
    out, pos = [], 0
    while True:
        start = text.find("<think>", pos)
        end = -1 if start < 0 else text.find("</think>", start + len("<think>"))
        if end < 0:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:start])
        pos = _SPACES_RE.match(text, end + len("</think>")).end()


def select_solution(
    index: int,
    responses: Sequence[str],
    rewards: Sequence[float],
    *,
    success_threshold: float = SUCCESS_THRESHOLD,
    dont_reprompt_on_self_success: bool = True,
) -> str | None:
    """The first successful response of the group (other than `index` if asked), METHODS §1."""
    for j, (response, reward) in enumerate(zip(responses, rewards, strict=True)):
        if reward >= success_threshold and not (dont_reprompt_on_self_success and j == index):
            return response
    return None


def build_reprompt(
    prompt_messages: Sequence[dict[str, str]],
    *,
    solution: str | None,
    feedback: str | None,
    feedback_only_without_solution: bool = True,
    remove_thinking: bool = True,
) -> TeacherPrompt:
    """SDPO reprompt, METHODS §1: system turns kept, last user turn rewritten."""
    if not prompt_messages or prompt_messages[-1].get("role") != "user":
        raise ValueError("prompt_messages must end with a user message (the question)")
    if feedback is not None and not feedback.strip():
        feedback = None  # SDPO treats empty/whitespace feedback as absent
    has_solution = solution is not None
    use_feedback = feedback is not None and not (feedback_only_without_solution and has_solution)
    context = [dict(m) for m in prompt_messages[:-1]]
    prompt = prompt_messages[-1]["content"]
    if not (has_solution or use_feedback):
        return TeacherPrompt([*context, {"role": "user", "content": prompt}], 0.0, False, False)
    solution_section = ""
    if has_solution:
        demo = strip_thinking(solution) if remove_thinking else solution
        solution_section = SOLUTION_TEMPLATE.format(successful_previous_attempt=demo)
    feedback_section = FEEDBACK_TEMPLATE.format(feedback_raw=feedback) if use_feedback else ""
    text = REPROMPT_TEMPLATE.format(
        prompt=prompt, solution=solution_section, feedback=feedback_section
    )
    return TeacherPrompt(
        [*context, {"role": "user", "content": text}], 1.0, has_solution, use_feedback
    )


def build_group_reprompts(
    prompt_messages: Sequence[dict[str, str]],
    responses: Sequence[str],
    rewards: Sequence[float],
    feedbacks: Sequence[str | None],
    *,
    success_threshold: float = SUCCESS_THRESHOLD,
    dont_reprompt_on_self_success: bool = True,
    feedback_only_without_solution: bool = True,
    remove_thinking: bool = True,
) -> list[TeacherPrompt]:
    """Teacher prompts for the G rollouts of one question (METHODS §1 defaults)."""
    if not len(responses) == len(rewards) == len(feedbacks):
        raise ValueError(
            f"group sizes differ: {len(responses)} responses, {len(rewards)} rewards, "
            f"{len(feedbacks)} feedbacks"
        )
    return [
        build_reprompt(
            prompt_messages,
            solution=select_solution(
                i,
                responses,
                rewards,
                success_threshold=success_threshold,
                dont_reprompt_on_self_success=dont_reprompt_on_self_success,
            ),
            feedback=feedbacks[i],
            feedback_only_without_solution=feedback_only_without_solution,
            remove_thinking=remove_thinking,
        )
        for i in range(len(responses))
    ]


def chat_token_ids(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    max_tokens: int = MAX_REPROMPT_TOKENS,
    *,
    enable_thinking: bool | None = None,
) -> list[int]:
    """Token ids of the HF chat template with the generation prompt, truncated right.

    `enable_thinking` goes to the template (Qwen3's: False appends an empty
    `<think>\n\n</think>\n\n` after the generation prompt, True lets the model think);
    None passes nothing, i.e. the template's own default (Qwen3: thinking on).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    extra = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True, **extra
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[:max_tokens])


def select_ssopd_pair(
    rewards: Sequence[float],
    lengths: Sequence[int],
    logps: Sequence[float] | None = None,
    *,
    correct_side: str = "shortest",
    wrong_side: str = "longest",
    success_threshold: float = SUCCESS_THRESHOLD,
) -> tuple[int, int] | None:
    """(index of y⁺, index of y⁻) for SSOPD, METHODS §6; None unless both sides exist.

    Ties go to the earliest rollout. `logps` (sequence log-probs) is needed for *-logp sides.
    """
    if correct_side not in CORRECT_SIDES or wrong_side not in WRONG_SIDES:
        raise ValueError(
            f"selectors ({correct_side!r}, {wrong_side!r}); correct side in {CORRECT_SIDES}, "
            f"wrong side in {WRONG_SIDES}"
        )
    if "logp" in correct_side + wrong_side and logps is None:
        raise ValueError("a *-logp selector needs `logps`")
    correct = [i for i, r in enumerate(rewards) if r >= success_threshold]
    wrong = [i for i, r in enumerate(rewards) if r < success_threshold]
    if not correct or not wrong:
        return None
    keys = {
        "shortest": lambda i: lengths[i],
        "longest": lambda i: -lengths[i],
        "max-logp": lambda i: -logps[i],
        "min-logp": lambda i: logps[i],
    }
    return min(correct, key=keys[correct_side]), min(wrong, key=keys[wrong_side])


def build_privileged_context(
    prompt_messages: Sequence[dict[str, str]],
    correct_response: str,
    *,
    keep_thinking: bool = False,
) -> list[dict[str, str]]:
    """SSOPD teacher messages (METHODS §6): the prompt with y⁺ as privileged context.

    The paper leaves the wording open; our default reuses SDPO's solution section so both
    self-teachers read the same phrasing. The teacher then scores y⁻ after these messages.
    `keep_thinking` keeps y⁺'s `<think>` reasoning: SSOPD trains reasoning models in thinking
    mode, where the reasoning is most of what y⁺ shows the teacher.
    """
    return build_reprompt(
        prompt_messages, solution=correct_response, feedback=None, remove_thinking=not keep_thinking
    ).messages
