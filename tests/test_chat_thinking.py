"""`model.enable_thinking` reaches every chat prompt a run builds (student rollouts, teacher
reprompts, evaluation, scripts/eval.py), rendered with Qwen3's real chat template, and SSOPD
keeps y+'s reasoning when thinking is on. The reference is transformers' own rendering."""

from __future__ import annotations

import pathlib
import runpy
import types

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxsd import algorithms
from jaxsd.models.sampler import SampleOutput
from jaxsd.rollout.engine import RolloutResult
from jaxsd.tasks import get_task
from jaxsd.tasks.reprompt import SOLUTION_TEMPLATE, chat_token_ids
from jaxsd.train.learner import plans_to_samples
from jaxsd.train.rollout_worker import ChatPrompts, EmbeddedWeights, RolloutWorker
from jaxsd.train.settings import run_settings
from tests.test_loop import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
QWEN3_TEMPLATE = (REPO / "tests" / "data" / "qwen3_chat_template.jinja").read_text().rstrip("\n")
NO_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
MESSAGES = [
    {"role": "system", "content": "Answer with a letter."},
    {"role": "user", "content": "Which gas is inert? A) He B) O2"},
]


@pytest.fixture(scope="module")
def qwen3_tokenizer(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer (Qwen special tokens) with Qwen3's chat template, saved and
    reloaded as a model folder ships it."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = QWEN3_TEMPLATE
    folder = tmp_path_factory.mktemp("qwen3_tok")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def test_chat_token_ids_passes_the_switch_to_qwen3s_template(qwen3_tokenizer):
    tok = qwen3_tokenizer
    for thinking in (False, True):
        want = tok.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        got = decode(tok, chat_token_ids(tok, MESSAGES, enable_thinking=thinking))
        assert got == want
    assert decode(tok, chat_token_ids(tok, MESSAGES, enable_thinking=False)).endswith(NO_THINK)
    thinking = decode(tok, chat_token_ids(tok, MESSAGES, enable_thinking=True))
    assert thinking.endswith("<|im_start|>assistant\n") and "<think>" not in thinking
    # None passes nothing: Qwen3's own default, which is thinking on
    assert chat_token_ids(tok, MESSAGES) == chat_token_ids(tok, MESSAGES, enable_thinking=True)


class RecordingEngine:
    """Rollout engine stand-in: records what it is asked and answers from a script."""

    def __init__(self, tok, answers):
        self.tok, self.answers, self.calls = tok, answers, []

    def generate(self, prompt_ids, n, sampling):
        self.calls.append((list(map(list, prompt_ids)), n, sampling))
        ids = [self.tok(self.answers[k % len(self.answers)])["input_ids"] for k in range(n)]
        tokens = [np.asarray(ids[k], np.int32) for _ in prompt_ids for k in range(n)]
        return RolloutResult(
            token_ids=tokens,
            logprobs=[np.full(len(t), -0.5, np.float32) for t in tokens],
            finish_reasons=["stop"] * len(tokens),
            prompt_index=[p for p in range(len(prompt_ids)) for _ in range(n)],
            weights_step=0,
        )


def fake_run(cfg, tok, engine, records):
    """The parts of a Run that prompt building reads, from the config's real settings."""
    settings = run_settings(cfg)
    task = get_task(settings.data.task_name, **dict(settings.data.task_kwargs))
    worker = RolloutWorker(
        engine=engine, weights=EmbeddedWeights(engine, None),
        prompts=ChatPrompts(tok, settings.prompts), task=task, stop_ids=(tok.eos_token_id,),
        rollout=settings.rollout, engine_settings=settings.engine, seed=settings.loop.seed,
    )  # fmt: skip
    return types.SimpleNamespace(
        settings=settings, task=task, worker=worker, eval_sets=[(task.name, task, records)]
    )


RECORD = {
    "id": "sciknoweval/chemistry/0",
    "system": "Answer with a letter.",
    "prompt": "Which gas is inert? A) He B) O2",
    "answer": "A",
    "domain": "chemistry",
}


@pytest.mark.parametrize("method", ["sdpo", "drift"])
def test_paper_preset_prompts_student_teacher_and_eval_without_thinking(qwen3_tokenizer, method):
    tok = qwen3_tokenizer
    cfg = load_config(method, "qwen3_8b")
    assert cfg.model.enable_thinking is False
    engine = RecordingEngine(tok, ["<answer>\nA\n</answer>", "<answer>\nB\n</answer>"])
    run = fake_run(cfg, tok, engine, [RECORD])
    want_prompt = tok.apply_chat_template(
        run.task.messages(RECORD), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )

    groups, _ = run.worker.collect([RECORD], 0)  # student rollouts
    assert decode(tok, engine.calls[-1][0][0]) == want_prompt
    plans, _, _ = run.settings.algorithm.plan(groups, run.settings.algorithm.init_state(0), epoch=0)
    samples = plans_to_samples(run.worker.prompts, groups, plans)
    teacher = [s.teacher_prompt_ids for s in samples if s.teacher_prompt_ids is not None]
    assert teacher, "the wrong rollouts have a correct sibling, so they carry a reprompt"
    for ids in teacher:
        assert decode(tok, ids).endswith(NO_THINK)
    assert all(decode(tok, s.prompt_ids) == want_prompt for s in samples)

    run.worker.evaluate(run.eval_sets, run.settings.evaluation)  # held-out evaluation
    prompts, n, sampling = engine.calls[-1]
    assert decode(tok, prompts[0]) == want_prompt and n == cfg.rollout.eval_n
    assert (sampling.top_k, sampling.min_p) == (cfg.rollout.eval_top_k, cfg.rollout.eval_min_p)


def test_ssopd_preset_thinks_and_its_teacher_keeps_the_reasoning(qwen3_tokenizer):
    tok = qwen3_tokenizer
    cfg = load_config("ssopd", "qwen3_8b")
    record = {"id": "math/0", "system": None, "prompt": "What is 2+2?", "answer": "4"}
    right = "<think>\nadd two and two\n</think>\n\n\\boxed{4}"
    engine = RecordingEngine(tok, [right, "\\boxed{5} because five is nice"])
    run = fake_run(cfg, tok, engine, [record])
    groups, _ = run.worker.collect([record], 0)
    want_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert decode(tok, engine.calls[-1][0][0]) == want_prompt  # thinking on: no empty block
    plans, _, _ = run.settings.algorithm.plan(groups, run.settings.algorithm.init_state(0), epoch=0)
    teacher = [p.teacher_messages for p in plans if p.teacher_messages is not None]
    assert len(teacher) == 1
    y_plus = tok.decode(tok(right)["input_ids"], skip_special_tokens=True)
    assert SOLUTION_TEMPLATE.format(successful_previous_attempt=y_plus) in teacher[0][-1]["content"]
    assert "add two and two" in teacher[0][-1]["content"]

    run.worker.evaluate(run.eval_sets, run.settings.evaluation)
    prompts, n, sampling = engine.calls[-1]
    assert n == 12 and (sampling.temperature, sampling.top_p) == (0.6, 0.95)
    assert (sampling.top_k, sampling.min_p) == (20, 0.0)
    # thinking off (the default algorithm): y+'s reasoning is stripped, as SDPO does
    plain = algorithms.get_algorithm("ssopd")
    plans, _, _ = plain.plan(groups, plain.init_state(0), epoch=0)
    content = next(p.teacher_messages for p in plans if p.teacher_messages)[-1]["content"]
    assert "add two and two" not in content and "\\boxed{4}" in content


def test_eval_script_and_embedded_generate_fn_pass_the_switch(qwen3_tokenizer, monkeypatch):
    from jaxsd import eval as eval_lib
    from jaxsd.models import sampler

    seen = {}

    def fake_generate(model, ids, **kw):
        seen.update(ids=ids, **kw)
        n = kw["n"]
        rows = len(ids) * n
        return SampleOutput(
            token_ids=[[1]] * rows,
            logprobs=[np.zeros(1)] * rows,
            sampling_logprobs=[np.zeros(1)] * rows,
            finish_reasons=["stop"] * rows,
            prompt_index=[i for i in range(len(ids)) for _ in range(n)],
        )

    monkeypatch.setattr(sampler, "generate", fake_generate)
    tok = qwen3_tokenizer
    fn = eval_lib.embedded_generate_fn(
        None, tok, max_new_tokens=4, stop_ids=[0], enable_thinking=False
    )
    fn([MESSAGES], n=2, temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, seed=0)
    assert decode(tok, seen["ids"][0]).endswith(NO_THINK)
    assert (seen["top_k"], seen["min_p"]) == (20, 0.05)

    calls = []
    monkeypatch.setattr(eval_lib, "evaluate_model", lambda **kw: calls.append(kw) or {"report": {}})
    script = runpy.run_path(str(REPO / "scripts" / "eval.py"))
    argv = ["--model", "m", "--task", "aime", "--enable_thinking", "false", "--top_k", "20"]
    script["main"](argv + ["--min_p", "0.05"])
    assert (calls[-1]["enable_thinking"], calls[-1]["top_k"], calls[-1]["min_p"]) == (
        False,
        20,
        0.05,
    )
    script["main"](["--model", "m", "--task", "aime"])
    assert calls[-1]["enable_thinking"] is None  # the template's default
