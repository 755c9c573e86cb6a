"""Shared fixtures: one tiny Qwen3 HF folder per test session (jaxsd.models.tiny)."""

import pytest

from jaxsd.models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init 2-layer Qwen3 folder (seed 0, default sizes) with a trained tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)
