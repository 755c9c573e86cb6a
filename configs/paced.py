"""PACED baseline (METHODS §5): SDPO weighted by frozen offline pass rates, a = 1."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="paced")
    c.algorithm = base.algorithm_config("paced", exponent=1.0)
    c.paced_offline_n = c.rollout.n  # rollouts per question in the offline pass
    return base.apply_settings(c, arg.settings)
