"""SDPO on code with rich environment feedback (METHODS §1): programs run in the sandbox
(jaxsd.tasks.sandbox), the first failing test's input / expected / actual output or the error's
last lines become the self-teacher's context when no sibling succeeded.

Presets:
- "" (default) / "smoke": the embedded CPU path on MBPP's train split with the shipped tiny model
  (it writes no Python, so its reward is 0 and every rollout is distilled from the feedback
  "no code block"; the run checks the plumbing, tests/test_tasks_code.py checks the verifier).
- "qwen3_8b": SDPO's LiveCodeBench v6 run (lasgroup/SDPO experiments/rich_feedback/run_sdpo.sh):
  Qwen3-8B, 32 questions × 8 rollouts, lr 1e-6 with no warm-up, reverse KL (alpha 1), top-20
  distillation, teacher EMA 0.01, one question per optimizer step (ppo_mini_batch_size 1 is
  ours to approximate: we take one optimizer step per batch), and the LiveCodeBench file at
  task.kwargs.path.
"""

import ml_collections

from configs import base


def sandbox_config(**overrides) -> ml_collections.ConfigDict:
    """`task.kwargs.sandbox`: jaxsd.tasks.sandbox.SandboxLimits fields."""
    values = dict(timeout_s=5.0, memory_mb=1024, file_mb=16, max_procs=16, keep_bytes=8192,
                  max_output_bytes=1 << 20)  # fmt: skip
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets above, settings in configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="sdpo_code")
    c.algorithm = base.algorithm_config("sdpo")
    c.task.name = "mbpp"
    # feedback_tokens: budget of the feedback text in the reprompt; workers: programs at once.
    c.task.kwargs = ml_collections.ConfigDict(
        dict(feedback_tokens=256, workers=64, sandbox=sandbox_config())
    )
    # MBPP prompts are 150-670 tokens of the tiny BPE (median 235); longer ones are dropped.
    c.task.max_prompt_len = 512
    c.task.max_reprompt_len = 768
    if c.preset == "smoke":
        c.task.max_prompt_len = 256  # keeps 218 of the 373 train problems
        c.task.max_reprompt_len = 384
        c.rollout.eval_questions = 2
    elif c.preset == "qwen3_8b":
        c.task.name = "livecodebench"
        c.task.kwargs = ml_collections.ConfigDict(
            dict(path="livecodebench/test.jsonl", test_fraction=0.2, feedback_tokens=1024,
                 workers=64, sandbox=sandbox_config(timeout_s=6.0, memory_mb=4096))
        )  # fmt: skip
        c.task.questions_per_step = 32
        c.rollout.n = 8
        c.rollout.max_new_tokens = 8192  # our default; the run script leaves SDPO's to its yaml
        c.rollout.eval_n = 4  # val_kwargs.n=4
        c.task.max_prompt_len = 2048
        c.task.max_reprompt_len = 10240
        c.optim.lr = 1e-6
        c.optim.warmup_steps = 0
        c.loss.alpha = 1.0
        c.loss.top_k = 20
        c.loss.teacher_ema = 0.01
    return base.apply_settings(c, arg.settings)
