"""Experiment configs (ml_collections); one file per method, shared `base`.

`configs` is a package of the installed project (pyproject.toml), so a config file that
ml_collections loads by path imports `configs.base` from any working directory.
"""

from __future__ import annotations

import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def resolve_path(spec: str) -> str:
    """A `--config` value `configs/<file>.py[:arg]` that does not exist from the working
    directory -> this package's file of that name; anything else unchanged. The README's
    `--config=configs/sc_sdpo.py` then runs from any folder."""
    path, colon, arg = spec.partition(":")
    parts = pathlib.PurePath(path).parts
    if len(parts) < 2 or parts[0] != "configs" or pathlib.Path(path).exists():
        return spec
    ours = PACKAGE_DIR.joinpath(*parts[1:])
    return f"{ours}{colon}{arg}" if ours.is_file() else spec


def resolve_argv(argv: list[str]) -> list[str]:
    """`argv` with its `--config=...` value passed through `resolve_path`."""
    flag = "--config="
    return [flag + resolve_path(a[len(flag) :]) if a.startswith(flag) else a for a in argv]
