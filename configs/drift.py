"""DRIFT (METHODS §7): SDPO warm-up, then negatives -> SDPO, positives -> rhythm GRPO.

Ablation without difficulty routing (every question routed as medium):
`--config.algorithm.difficulty_routing=False`."""

import pathlib
import sys

# ml_collections loads config files by path; make the sibling `configs.base` importable.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs import base  # noqa: E402


def get_config(arg=None):
    """Presets: "" (embedded CPU run), "smoke", "qwen3_8b" (see configs/base.py)."""
    c = base.get_config(arg, run_name="drift")
    c.algorithm = base.algorithm_config("drift")
    if c.preset == "smoke":
        c.algorithm.warmup_steps = 1  # reach stage 2 within the 3 smoke steps
    elif c.preset == "default":
        c.algorithm.warmup_steps = 5
    return c
