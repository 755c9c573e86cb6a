"""Throwaway virtualenvs for the peers (never jaxsd's .venv): create, install, reuse.

Each peer gets `<root>/<name>/` built with the interpreter running this script. A finished
install writes `<root>/<name>/jaxsd-peer.json` with its requirements, so a later run with the
same requirements reuses the venv; the pip log stays in `<root>/<name>.install.log`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_ROOT = Path("/tmp/jaxsd-peers")

# The versions bench/README.md's peer figures were measured with, pinned with the packages
# the peer code paths depend on (TRL's experimental SDPOTrainer, tunix's grpo_loss_fn and
# PeftTrainer are not stable APIs), so a rerun measures the same peers. torch is pinned in
# both sets: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 CPU lies on disk.
PINNED: dict[str, list[str]] = {
    "trl": [
        "torch==2.13.0",
        "trl==1.16.0",
        "transformers==5.24.0",
        "accelerate==1.15.0",
        "datasets==5.2.0",
    ],
    "tunix": [
        "google-tunix==0.1.7",
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "qwix==0.1.8",
    ],
}
# `--latest-peers`: the newest releases, in their own venvs (`<name>-latest`); the runners may
# need updating where a peer changed its API.
LATEST: dict[str, list[str]] = {
    "trl": ["torch==2.13.0", "trl", "datasets"],
    "tunix": ["google-tunix"],
}


def requirements(name: str, latest: bool = False) -> list[str]:
    table = LATEST if latest else PINNED
    if name not in table:
        raise ValueError(f"unknown peer {name!r}; use one of {sorted(table)}")
    return table[name]


def venv_dir(root: Path, name: str, latest: bool = False) -> Path:
    return root / (f"{name}-latest" if latest else name)


def python_of(root: Path, name: str, latest: bool = False) -> Path:
    return venv_dir(root, name, latest) / "bin" / "python"


def _marker(root: Path, name: str, latest: bool) -> Path:
    return venv_dir(root, name, latest) / "jaxsd-peer.json"


def is_ready(root: Path, name: str, latest: bool = False) -> bool:
    """The venv exists and a finished install recorded exactly today's requirements."""
    marker = _marker(root, name, latest)
    if not (marker.exists() and python_of(root, name, latest).exists()):
        return False
    return json.loads(marker.read_text()).get("requirements") == requirements(name, latest)


def ensure(name: str, root: Path = DEFAULT_ROOT, *, skip_install: bool = False,
           latest: bool = False, timeout_s: float = 1800) -> dict[str, Any]:  # fmt: skip
    """Create/reuse the venv of peer `name`; returns {"python", "installed", ...} or {"error"}.

    A venv whose recorded requirements differ (e.g. built before the pins) is updated in
    place by the same `pip install`."""
    reqs = requirements(name, latest)
    py = python_of(root, name, latest)
    if is_ready(root, name, latest):
        return {"python": str(py), "installed": "reused"}
    if skip_install:
        if py.exists():  # an unmarked venv someone built by hand: try it as is
            return {"python": str(py), "installed": "skipped (unverified venv)"}
        return {"error": f"--skip-install but {py} does not exist; run once without it"}
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{venv_dir(root, name, latest).name}.install.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        steps = [[sys.executable, "-m", "venv", str(venv_dir(root, name, latest))],
                 [str(py), "-m", "pip", "install", *reqs]]  # fmt: skip
        for cmd in steps:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout_s).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                return {"error": f"`{' '.join(cmd)}` timed out after {timeout_s} s; see {log}"}
            if rc != 0:
                tail = [ln for ln in log.read_text().splitlines() if ln.startswith("ERROR")][-3:]
                return {"error": f"`{' '.join(cmd)}` exited {rc}: {tail}; full log {log}"}
    _marker(root, name, latest).write_text(json.dumps({"requirements": reqs}))
    return {"python": str(py), "installed": f"fresh in {time.perf_counter() - t0:.0f} s"}
