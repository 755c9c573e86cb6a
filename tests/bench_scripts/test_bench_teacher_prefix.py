"""bench/teacher_prefix.py (tests of a bench script, not of jaxsd): prefix-tree token counts
against hand counts, the step's FLOP share, and the rows it builds from train samples."""

import types

import pytest


def test_prefix_tree_counts_each_shared_prefix_once(repo_module):
    tree = repo_module("bench/teacher_prefix.py").prefix_tree_tokens
    # 1 2 3 4 / 1 2 3 5 / 1 2 6 / 7: nodes 1,2,3,4 + 5 + 6 + 7 = 7 (13 tokens as rows)
    assert tree([[1, 2, 3, 5], [7], [1, 2, 3, 4], [1, 2, 6]]) == 7
    assert tree([[1, 2], [1, 2]]) == 2  # identical rows run once
    assert tree([[1, 2], [1, 2, 3]]) == 3  # a row that is another's prefix adds nothing
    assert tree([[4, 5], [6]]) == 3 and tree([]) == 0


def test_side_counts_and_step_share(repo_module):
    bench = repo_module("bench/teacher_prefix.py")
    groups = [[[1, 2, 3], [1, 2, 4]], [[9, 9]]]  # 8 tokens today, 4 + 2 = 6 with sharing
    side = bench.side_counts(groups)
    assert (side["tokens"], side["tokens_shared"]) == (8, 6)
    assert side["saved_frac"] == pytest.approx(0.25)
    teacher = {"tokens": 100, "tokens_shared": 40}
    student = {"tokens": 50}
    assert bench.step_share(teacher, student) == pytest.approx(2 * 60 / (200 + 300))


def test_rows_join_prompt_or_reprompt_with_the_response_per_group(repo_module):
    bench = repo_module("bench/teacher_prefix.py")

    def sample(prompt, reprompt, response):
        return types.SimpleNamespace(
            prompt_ids=prompt, teacher_prompt_ids=reprompt, response_ids=response
        )

    samples = [sample([1], [5, 6], [2]), sample([1], None, [3]), sample([7], [8], [9])]
    student, teacher = bench.batch_rows(samples, ["a", "a", "b"])
    assert student == [[[1, 2], [1, 3]], [[7, 9]]]
    assert teacher == [[[5, 6, 2], [1, 3]], [[8, 9]]]  # no reprompt: the student prompt
