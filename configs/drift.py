"""DRIFT (METHODS §7): SDPO warm-up, then negatives -> SDPO, positives -> rhythm GRPO.

Ablation without difficulty routing (every question routed as medium):
`--config.algorithm.difficulty_routing=False`."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="drift")
    c.algorithm = base.algorithm_config("drift")
    if c.preset == "smoke":
        c.algorithm.warmup_steps = 1  # reach stage 2 within the 3 smoke steps
    elif c.preset == "default":
        c.algorithm.warmup_steps = 5
    elif c.preset == "miniature":  # the paper's stage-1 steps, scaled as every duration
        c.algorithm.warmup_steps = base.miniature_steps(c.algorithm.warmup_steps)
    return base.apply_settings(c, arg.settings)
