"""Hard-filter baseline (METHODS §5): SDPO only on questions with 0 < p < 1."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="hard_filter")
    c.algorithm = base.algorithm_config("hard_filter")
    return base.apply_settings(c, arg.settings)
