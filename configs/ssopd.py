"""SSOPD (METHODS §5-§6): GRPO + frontier-weighted clipped forward KL, fixed teacher."""

import pathlib
import sys

# ml_collections loads config files by path; make the sibling `configs.base` importable.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs import base  # noqa: E402


def get_config(arg=None):
    """Presets: "" (embedded CPU run), "smoke", "qwen3_8b" (see configs/base.py)."""
    c = base.get_config(arg, run_name="ssopd")
    c.algorithm = base.algorithm_config("ssopd")
    return c
