"""GRPO w/o Norm (METHODS §4): advantage r - mean r."""

import pathlib
import sys

# ml_collections loads config files by path; make the sibling `configs.base` importable.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs import base  # noqa: E402


def get_config(arg=None):
    """Presets: "" (embedded CPU run), "smoke", "qwen3_8b" (see configs/base.py)."""
    c = base.get_config(arg, run_name="grpo_no_norm")
    c.algorithm = base.algorithm_config("grpo", normalize=False)
    if c.preset == "qwen3_8b":
        c.rollout.max_new_tokens = 8192  # same budget as GRPO (table A.2)
    return c
