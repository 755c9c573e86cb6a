"""SciKnowEval MCQ task on SDPO's real splits (../shared/data/sciknoweval)."""

import pytest

from jaxsd.tasks import get_task
from jaxsd.tasks.science import DOMAINS

# SDPO data/format/sciknoweval.py writes this exact system prompt into every record.
SDPO_SYSTEM_HEAD = "\nGiven a question and four options, please select the right answer."


@pytest.fixture(scope="module")
def test_records():
    return get_task("sciknoweval").load("test")


def test_all_domains_concatenated_with_sdpo_sizes(test_records):
    sizes = {d: len(get_task(f"sciknoweval_{d}").load("test")) for d in DOMAINS}
    assert sizes == {"biology": 50, "chemistry": 210, "material": 94, "physics": 80}
    assert len(test_records) == sum(sizes.values())
    assert len({r["id"] for r in test_records}) == len(test_records)


def test_messages_are_system_then_question(test_records):
    task = get_task("sciknoweval")
    for r in test_records:
        msgs = task.messages(r)
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert msgs[0]["content"].startswith(SDPO_SYSTEM_HEAD)
        assert msgs[1]["content"].endswith("Please reason step by step.")
        assert f"\n{r['answer']}: " in msgs[1]["content"]  # the right option is listed


def test_ground_truth_scores_one_and_other_letters_zero(test_records):
    task = get_task("sciknoweval")
    for r in test_records:
        good = f"<reasoning>\nbecause\n</reasoning>\n<answer>\n{r['answer']}\n</answer>"
        v = task.verify(good, r)
        assert (v.reward, v.feedback, v.extracted) == (1.0, None, r["answer"])
        wrong = next(x for x in "ABCD" if x != r["answer"])
        v = task.verify(good.replace(f"\n{r['answer']}\n</answer>", f"\n{wrong}\n</answer>"), r)
        assert v.reward == 0.0 and v.extracted == wrong
        assert wrong in v.feedback and "incorrect" in v.feedback
        assert r["answer"] not in v.feedback.replace(wrong, "")  # never leaks the right letter


def test_only_the_last_answer_tag_counts():
    task = get_task("sciknoweval_physics")
    r = {"answer": "B", "system": None, "prompt": "q"}
    assert task.verify("<answer>B</answer> then <answer> C </answer>", r).reward == 0.0
    assert task.verify("<answer>C</answer> then <answer> B </answer>", r).reward == 1.0
    # SDPO semantics: without any tag the whole stripped text is the answer.
    assert task.verify("  B \n", r).reward == 1.0
    assert task.verify("<answer>B", r).reward == 1.0  # unclosed tag: rest of the text


def test_feedback_for_format_errors_and_sdpo_style():
    r = {"answer": "A", "system": None, "prompt": "q"}
    rich = get_task("sciknoweval").verify("I think it is A.", r)
    assert rich.reward == 0.0 and "<answer>" in rich.feedback
    v = get_task("sciknoweval").verify("<answer>A or B</answer>", r)
    assert v.reward == 0.0 and "single option letter" in v.feedback
    # SDPO's mcq reward gives no feedback at all.
    sdpo = get_task("sciknoweval", feedback_style="sdpo")
    assert sdpo.verify("<answer>B</answer>", r).feedback is None


def test_train_split_loads_and_is_disjoint_from_test(test_records):
    train = get_task("sciknoweval").load("train")
    assert len(train) == 450 + 1890 + 841 + 720
    assert not {r["id"] for r in train} & {r["id"] for r in test_records}
