"""SDPO reprompt (METHODS §1) and SSOPD privileged context (METHODS §6): exact strings."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxsd.tasks import (
    build_group_reprompts,
    build_privileged_context,
    build_reprompt,
    chat_token_ids,
    select_ssopd_pair,
    strip_thinking,
)

SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2+2?"}


def test_solution_only_exact_string():
    t = build_reprompt([SYS, USER], solution="<think>hmm</think>\n It is 4.", feedback="no")
    assert t.messages == [
        SYS,
        {
            "role": "user",
            "content": "What is 2+2?\nCorrect solution:\n\nIt is 4.\n\n\n"
            "Correctly solve the original question.",
        },
    ]
    assert (t.sd_mask, t.used_solution, t.used_feedback) == (1.0, True, False)


def test_feedback_only_exact_string():
    t = build_reprompt([USER], solution=None, feedback="The answer 5 is incorrect.")
    assert t.messages == [
        {
            "role": "user",
            "content": "What is 2+2?\nThe following is feedback from your unsuccessful earlier "
            "attempt:\n\nThe answer 5 is incorrect.\n\n\nCorrectly solve the original question.",
        }
    ]
    assert (t.sd_mask, t.used_solution, t.used_feedback) == (1.0, False, True)


def test_both_sections_when_feedback_allowed_with_solution():
    t = build_reprompt([USER], solution="4", feedback="bad", feedback_only_without_solution=False)
    assert t.messages[-1]["content"] == (
        "What is 2+2?\nCorrect solution:\n\n4\n\nThe following is feedback from your "
        "unsuccessful earlier attempt:\n\nbad\n\n\nCorrectly solve the original question."
    )


@pytest.mark.parametrize("feedback", [None, "", "  \n"])
def test_neither_keeps_prompt_and_masks(feedback):
    t = build_reprompt([SYS, USER], solution=None, feedback=feedback)
    assert t.messages == [SYS, USER] and t.sd_mask == 0.0


def test_thinking_kept_when_asked():
    t = build_reprompt([USER], solution="<think>a</think>4", feedback=None, remove_thinking=False)
    assert "<think>a</think>4" in t.messages[-1]["content"]


def test_group_uses_first_other_success_and_never_self():
    responses = ["r0", "r1", "r2", "r3"]
    rewards = [1.0, 0.0, 1.0, 0.0]
    feedbacks = [None, "fb1", None, None]
    out = build_group_reprompts([USER], responses, rewards, feedbacks)
    sol = [t.used_solution and t.messages[-1]["content"].split("\n\n")[1] for t in out]
    assert sol == ["r2", "r0", "r0", "r0"]
    assert [t.used_feedback for t in out] == [False] * 4  # a solution exists for everyone
    lone = build_group_reprompts([USER], ["ok", "no", "no2"], [1.0, 0.0, 0.0], [None, "f", None])
    assert [t.sd_mask for t in lone] == [0.0, 1.0, 1.0]  # the lone success has no teacher
    allow_self = build_group_reprompts(
        [USER], ["ok"], [1.0], [None], dont_reprompt_on_self_success=False
    )
    assert allow_self[0].used_solution and "\n\nok\n" in allow_self[0].messages[-1]["content"]
    none = build_group_reprompts([USER], ["a", "b"], [0.0, 0.0], ["fa", None])
    assert [t.sd_mask for t in none] == [1.0, 0.0] and none[0].used_feedback


def test_group_size_mismatch_and_missing_user_turn_raise():
    with pytest.raises(ValueError, match="group sizes differ"):
        build_group_reprompts([USER], ["a"], [1.0, 0.0], [None])
    with pytest.raises(ValueError, match="must end with a user message"):
        build_reprompt([SYS], solution="x", feedback=None)


THINK = st.lists(
    st.sampled_from(["<think>", "</think>", "a", " ", "\n", "\t", "<", ">", "think", "x y"]),
    max_size=25,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(THINK)
def test_strip_thinking_matches_sdpo_regex(text):
    expected = re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)
    assert strip_thinking(text) == expected


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "<u>", "<a>", "Q", "A", "x", "y", "z"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}<s> {% else %}<u> {% endif %}"
        "{{ m.content }} {% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    return fast


def test_chat_template_with_generation_prompt_and_right_truncation(tokenizer):
    msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": "Q y z"}]
    # "<s> x <u> Q y z <a>" in the toy vocabulary above.
    assert chat_token_ids(tokenizer, msgs) == [1, 6, 2, 4, 7, 8, 3]
    assert chat_token_ids(tokenizer, msgs, max_tokens=4) == [1, 6, 2, 4]
    with pytest.raises(ValueError):
        chat_token_ids(tokenizer, msgs, max_tokens=0)


def test_ssopd_pair_selectors():
    rewards, lengths, logps = [1, 0, 1, 0, 1], [5, 3, 2, 7, 2], [-1.0, -9.0, -4.0, -2.0, -0.5]
    assert select_ssopd_pair(rewards, lengths) == (
        2,
        3,
    )  # shortest correct (first tie), longest wrong
    assert select_ssopd_pair(rewards, lengths, correct_side="longest", wrong_side="shortest") == (
        0,
        1,
    )
    assert select_ssopd_pair(
        rewards, lengths, logps, correct_side="max-logp", wrong_side="min-logp"
    ) == (4, 1)
    assert select_ssopd_pair(rewards, lengths, logps, correct_side="min-logp") == (2, 3)
    assert select_ssopd_pair([1, 1], [1, 2]) is None and select_ssopd_pair([0, 0], [1, 2]) is None
    with pytest.raises(ValueError, match="needs `logps`"):
        select_ssopd_pair(rewards, lengths, correct_side="max-logp")
    with pytest.raises(ValueError, match="selectors"):
        select_ssopd_pair(rewards, lengths, wrong_side="max-logp")


def test_privileged_context_holds_the_correct_response():
    msgs = build_privileged_context([SYS, USER], "<think>t</think>It is 4.")
    assert msgs == [
        SYS,
        {
            "role": "user",
            "content": "What is 2+2?\nCorrect solution:\n\nIt is 4.\n\n\n"
            "Correctly solve the original question.",
        },
    ]
