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

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 CPU lies on disk.
REQUIREMENTS: dict[str, list[str]] = {
    "trl": ["torch==2.13.0", "trl", "datasets"],
    "tunix": ["google-tunix"],
}


def python_of(root: Path, name: str) -> Path:
    return root / name / "bin" / "python"


def _marker(root: Path, name: str) -> Path:
    return root / name / "jaxsd-peer.json"


def is_ready(root: Path, name: str) -> bool:
    marker = _marker(root, name)
    if not (marker.exists() and python_of(root, name).exists()):
        return False
    return json.loads(marker.read_text()).get("requirements") == REQUIREMENTS[name]


def ensure(name: str, root: Path = DEFAULT_ROOT, *, skip_install: bool = False,
           timeout_s: float = 1800) -> dict[str, Any]:  # fmt: skip
    """Create/reuse the venv of peer `name`; returns {"python", "installed", ...} or {"error"}."""
    if name not in REQUIREMENTS:
        raise ValueError(f"unknown peer {name!r}; use one of {sorted(REQUIREMENTS)}")
    py = python_of(root, name)
    if is_ready(root, name):
        return {"python": str(py), "installed": "reused"}
    if skip_install:
        if py.exists():  # an unmarked venv someone built by hand: try it as is
            return {"python": str(py), "installed": "skipped (unverified venv)"}
        return {"error": f"--skip-install but {py} does not exist; run once without it"}
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}.install.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        steps = [[sys.executable, "-m", "venv", str(root / name)],
                 [str(py), "-m", "pip", "install", *REQUIREMENTS[name]]]  # fmt: skip
        for cmd in steps:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout_s).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                return {"error": f"`{' '.join(cmd)}` timed out after {timeout_s} s; see {log}"}
            if rc != 0:
                tail = [ln for ln in log.read_text().splitlines() if ln.startswith("ERROR")][-3:]
                return {"error": f"`{' '.join(cmd)}` exited {rc}: {tail}; full log {log}"}
    _marker(root, name).write_text(json.dumps({"requirements": REQUIREMENTS[name]}))
    return {"python": str(py), "installed": f"fresh in {time.perf_counter() - t0:.0f} s"}
