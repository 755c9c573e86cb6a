"""Test-time SDPO (jaxsd.test_time): per question, rounds of `test_time.k` samples -> verify ->
SDPO update on that question alone, until the first success or `test_time.budget` generations.

    python scripts/test_time.py --config=configs/test_time_sdpo.py

Presets:
- "" (default): the embedded demonstration: the shipped tiny model (SFT'd on 1-digit sums, which
  it solves at best-of-64 every time) on the 40 test questions of 2-digit arithmetic, those of
  them the base model fails at best-of-64 (T=1), 8 samples per round.
- "smoke": two questions, k=2, budget 4 (CI).
- "qwen3_8b": configs/sdpo_code.py's LiveCodeBench settings with k=8, budget 64 (our default).
"""

import ml_collections

from configs import base, sdpo_code


def test_time_config(k: int, budget: int, **overrides) -> ml_collections.ConfigDict:
    """`test_time.*`; every key is documented here."""
    values = dict(
        k=k,  # samples per round (one SDPO update per failed round)
        budget=budget,  # generations per question, a multiple of k; also the base's best-of-n
        select="base_failures",  # "all" | "base_failures": keep questions the base fails
        split="test",  # the task split(s) the questions come from, comma-separated
        ids="",  # comma-separated record ids of that split ("" = the first num_questions)
        num_questions=0,  # 0 = the whole split
        questions_file="",  # a JSON-lines file of task records instead of a split
        base_questions_per_call=8,  # questions per base-sampling call (memory)
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets above, settings in configs/base.py."""
    arg = base.parse_arg(arg)
    preset = arg.preset
    c = sdpo_code.get_config(preset) if preset == "qwen3_8b" else base.preset_config(preset)
    c.algorithm = base.algorithm_config("sdpo")
    c.run_dir = f"runs/test_time_sdpo_{preset}_{{hash}}"
    c.eval_every = 0
    c.checkpoint_every = 0
    c.task.questions_per_step = 1
    c.test_time = test_time_config(8, 64)
    if preset == "default":
        c.task.kwargs.update(digits=2, test_size=40, train_size=150)
    elif preset == "smoke":
        c.test_time = test_time_config(2, 4, select="all", num_questions=2)
    c.rollout.n = c.test_time.k
    return base.apply_settings(c, arg.settings)
