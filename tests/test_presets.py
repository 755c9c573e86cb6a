"""The paper presets use the papers' data and feedback: SciKnowEval one domain at a time with
SDPO's multiple-choice verifier (no feedback, so p = 0 questions get no teacher), SSOPD's
math training mix and evaluation sets, the ablation switches, and tool use failing early
where its training split is not shipped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxsd import algorithms
from jaxsd.tasks import default_data_dir, get_task
from jaxsd.train import build
from jaxsd.train.settings import parse_eval_sets, run_settings
from tests.test_loop import load_config

SCIENCE_METHODS = ("sc_sdpo", "sdpo", "paced", "hard_filter", "srpo", "drift")


def rollouts(record, responses, task):
    out = []
    for text in responses:
        verdict = task.verify(text, record)
        out.append(
            algorithms.Rollout(
                question_id=record["id"], prompt=task.messages(record), response=text,
                response_ids=[1, 2, 3], logprobs=np.full(3, -1.0, np.float32),
                reward=verdict.reward, feedback=verdict.feedback, entropy=1.0,
            )
        )  # fmt: skip
    return out


@pytest.mark.parametrize("method", SCIENCE_METHODS)
def test_paper_preset_gives_p0_science_questions_no_teacher(method):
    cfg = load_config(method, "qwen3_8b")
    settings = run_settings(cfg)
    task = get_task(settings.data.task_name, **dict(settings.data.task_kwargs))
    record = task.load("train")[0]
    wrong = [x for x in "ABCD" if x != record["answer"]]
    responses = [
        f"<reasoning>\nguess\n</reasoning>\n<answer>\n{wrong[k % 3]}\n</answer>" for k in range(8)
    ]
    responses[1] = "I am not sure."  # no <answer> tag either: SDPO's verifier still says nothing
    group = algorithms.group_rollouts(rollouts(record, responses, task))
    assert all(r.feedback is None and r.reward == 0.0 for r in group[0].rollouts)
    algo = settings.algorithm
    state = algo.init_state(0)
    if method == "paced":
        from jaxsd.algorithms import paced

        state = paced.freeze_pass_rates(state, {record["id"]: 0.5})
    if method == "drift":
        state = dataclasses.replace(state, num_plans=algo.warmup_steps)  # stage 2
    plans, _, _ = algo.plan(group, state, epoch=0)
    assert all(p.teacher_messages is None for p in plans)
    assert all(p.weights.sd_weight == 0.0 for p in plans)
    # "rich" stays an option: the same question then distils from our feedback wording
    rich = get_task(settings.data.task_name, feedback_style="rich")
    group = algorithms.group_rollouts(rollouts(record, responses, rich))
    sdpo = algorithms.get_algorithm("sdpo")
    plans, _, _ = sdpo.plan(group, sdpo.init_state(0), epoch=0)
    assert all(p.weights.sd_weight == 1.0 and p.teacher_messages for p in plans)


@pytest.mark.parametrize("domain", ["biology", "chemistry", "material", "physics"])
def test_sciknoweval_trains_and_evaluates_one_domain(domain):
    cfg = load_config("sc_sdpo", "qwen3_8b")
    cfg.task.name = f"sciknoweval_{domain}"  # --config.task.name=sciknoweval_<domain>
    task, train, test, eval_sets = build.load_data(run_settings(cfg).data)
    assert {r["domain"] for r in train} == {r["domain"] for r in test} == {domain}
    assert [(name, len(records)) for name, _, records in eval_sets] == [(task.name, len(test))]


def test_ssopd_preset_trains_on_math_and_aime_and_evaluates_three_sets():
    cfg = load_config("ssopd", "qwen3_8b")
    with pytest.warns(UserWarning, match="2 rows have no 'answer'"):
        task, train, test, eval_sets = build.load_data(run_settings(cfg).data)
        math_train = get_task("math500").load("train")
    aime_train = get_task("aime").load("train")
    # MATH train's 7474 rows less the 2 without a gold answer, and AIME 1983-2023
    assert len(train) == len(math_train) + len(aime_train) == 7472 + 975
    assert {r["id"] for r in train} == {r["id"] for r in math_train + aime_train}
    names = [name for name, _, _ in eval_sets]
    assert names == ["aime_2024", "aime_2025", "hmmt_test"]
    for (_, eval_task, records), (name, split) in zip(
        eval_sets, [("aime", "2024"), ("aime", "2025"), ("hmmt", "test")], strict=True
    ):
        assert eval_task.name == name
        assert [r["id"] for r in records] == [r["id"] for r in get_task(name).load(split)]
    assert task.verify("so \\boxed{12}", train[-1]).reward == float(train[-1]["answer"] == "12")
    with pytest.raises(ValueError, match="task.eval_sets"):
        parse_eval_sets("aime2024")


def test_ssopd_fixed_coefficient_ablation():
    p = np.asarray([0.25, 0.5, 1.0])
    frontier = algorithms.get_algorithm("ssopd", frontier_scale=4.0)
    np.testing.assert_allclose(frontier.pair_weights(p), 4.0 * p * (1 - p))
    fixed = algorithms.get_algorithm("ssopd", weighting="fixed", fixed_weight=0.7)
    np.testing.assert_allclose(fixed.pair_weights(p), [0.7, 0.7, 0.7])
    with pytest.raises(ValueError, match="algorithm.weighting"):
        algorithms.get_algorithm("ssopd", weighting="constant")


def test_drift_without_difficulty_routing_routes_every_question_as_medium():
    def group(qid, rewards):
        return algorithms.Group(
            qid,
            tuple(
                algorithms.Rollout(qid, [{"role": "user", "content": "q"}], f"r{k}", [1] * (k + 1),
                                   np.full(k + 1, -1.0, np.float32), reward=r, entropy=1.0)
                for k, r in enumerate(rewards)
            ),
        )  # fmt: skip

    easy = group("easy", [1, 1, 1, 1, 1, 1, 1, 0])  # p = 7/8 > 0.8: γ = 0.5, no rhythm gate
    routed = algorithms.get_algorithm("drift", warmup_steps=0)
    flat = algorithms.get_algorithm("drift", warmup_steps=0, difficulty_routing=False)
    plans, _, _ = routed.plan([easy], routed.init_state(0), epoch=0)
    assert {(p.weights.pg_weight, p.weights.rhythm_beta) for p in plans[:7]} == {(0.5, 0)}
    plans, _, _ = flat.plan([easy], flat.init_state(0), epoch=0)
    assert {(p.weights.pg_weight, p.weights.rhythm_beta) for p in plans[:7]} == {(1.0, 1)}


@pytest.mark.parametrize(
    "task_name,expected,source",
    [
        ("tooluse", "sdpo_tooluse/train.json", "github.com/lasgroup/SDPO"),
        ("toolalpaca", "toolalpaca/train_data.json", "github.com/tangqiaoyu/ToolAlpaca"),
    ],
)
def test_tool_use_train_split_fails_before_any_model_load(
    task_name, expected, source, tmp_path, monkeypatch
):
    shared = default_data_dir()
    monkeypatch.setenv("JAXSD_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    cfg = load_config("sdpo", "smoke")
    cfg.task.name, cfg.run_dir = task_name, str(tmp_path / "run")
    cfg.task.kwargs = {}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(build, "from_pretrained", no_model)
    monkeypatch.setattr(build, "resolve_model_dir", no_model)
    with pytest.raises(FileNotFoundError) as err:
        build.build(cfg)
    message = str(err.value)
    assert str(tmp_path / expected) in message and source in message
    assert "JAXSD_DATA_DIR" in message
    # the shipped evaluation files still load; the train split names the same file there too
    split = "test" if task_name == "tooluse" else "eval_real"
    assert len(get_task(task_name).load(split, data_dir=shared)) > 0
    with pytest.raises(FileNotFoundError, match=str(shared / expected)):
        get_task(task_name).load("train", data_dir=shared)
