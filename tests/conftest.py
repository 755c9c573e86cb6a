"""Shared fixtures: one tiny Qwen3 HF folder per test session (jaxsd.models.tiny), a loader
for the repo's scripts that are files rather than package modules (bench/, scripts/), and a
runner for those scripts as the command line runs them."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from jaxsd.models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init 2-layer Qwen3 folder (seed 0, default sizes) with a trained tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)


@pytest.fixture(scope="session")
def repo_module():
    """`repo_module("bench/trace_summary.py")`: import a repo file by path (not on sys.path)."""
    root = pathlib.Path(__file__).resolve().parent.parent

    def load(relative_path: str):
        path = root / relative_path
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def run_repo_script():
    """`run_repo_script("bench/topk.py", "--k", "5")`: run a repo script with this interpreter
    from the repo root; returns the CompletedProcess (text stdout/stderr)."""
    root = pathlib.Path(__file__).resolve().parent.parent

    def run(relative_path: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(root / relative_path), *args],
            capture_output=True, text=True, timeout=timeout, cwd=root,
        )  # fmt: skip

    return run
