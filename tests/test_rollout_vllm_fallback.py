"""The rollout server's load_weights control flow, with vLLM replaced by a recording fake.

The real engine's restart path is tested in test_rollout_vllm.py (`in_place=False`); what
needs a fake is the *automatic* fallback: an in-place reload that fails half-way must
rebuild the engine from an HF folder exported from the same step, while a checkpoint that
cannot be restored must leave the engine (and its weights step) untouched.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxsd.rollout import publish_weights, vllm_server
from jaxsd.rollout.vllm_server import RolloutServer, WorkerOptions


class FakeLLM:
    """Answers the worker RPC with a scripted result and records what the server did."""

    def __init__(self, model_dir, rpc_result, events):
        self.model_dir = pathlib.Path(model_dir)
        self.rpc_result = rpc_result
        self.events = events
        self.llm_engine = self  # close() calls llm.llm_engine.engine_core.shutdown()
        self.engine_core = self
        events.append(("build", self.model_dir))

    def collective_rpc(self, method, args):
        self.events.append(("rpc", method, pathlib.Path(args[0]).name))
        return [self.rpc_result]

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))

    def shutdown(self):
        self.events.append(("shutdown", self.model_dir))


@pytest.fixture
def server_factory(tiny_model_dir, tmp_path, monkeypatch):
    def make(rpc_result):
        events = []
        monkeypatch.setattr(
            vllm_server, "build_llm", lambda d, opts: FakeLLM(d, rpc_result, events)
        )
        opts = WorkerOptions(
            name="fake",
            model_dir=str(tiny_model_dir),
            weights_dir=str(tmp_path / "weights"),
            address_file=str(tmp_path / "address.json"),
            parent_pid=0,
        )
        return RolloutServer(opts), events

    return make


@pytest.fixture
def published(tiny_model_dir, tmp_path):
    """Steps 4 and 5 published by the trainer: the folder's weights, shifted per step."""
    base = load_file(str(pathlib.Path(tiny_model_dir) / "model.safetensors"))
    states = {s: {k: v + np.float32(s) for k, v in base.items()} for s in (4, 5)}
    for step, state in states.items():
        publish_weights(state, tmp_path / "weights", step)
    return states


RELOAD_FAILED = {"ok": False, "stage": "reload", "error": "RuntimeError: half-replaced"}
RESTORE_FAILED = {"ok": False, "stage": "restore", "error": "CheckpointRestoreError: bad"}


def test_a_failed_in_place_reload_restarts_the_engine_from_that_steps_export(
    server_factory, published, tiny_model_dir, capsys
):
    server, events = server_factory(RELOAD_FAILED)
    reply = server.load_weights(4)
    assert reply["ok"] and reply["mode"] == "restart" and reply["weights_step"] == 4
    assert server.step == 4
    kinds = [e[0] for e in events]
    assert kinds == ["build", "rpc", "shutdown", "build"], events
    rebuilt_from = events[-1][1]
    assert rebuilt_from == server.export_dir / "4"
    exported = load_file(str(rebuilt_from / "model.safetensors"))
    assert exported.keys() == published[4].keys()
    for k, v in published[4].items():
        np.testing.assert_array_equal(exported[k], v)
    # The export carries the architecture and tokenizer files, not the folder's weights.
    src_files = {f.name for f in pathlib.Path(tiny_model_dir).iterdir() if f.is_file()}
    assert {f.name for f in rebuilt_from.iterdir()} == src_files
    assert "falling back to restarting the engine" in capsys.readouterr().out

    # The next failed reload exports step 5 and deletes step 4's folder (the engine read it).
    server.load_weights(5)
    assert sorted(p.name for p in server.export_dir.iterdir()) == ["5"]
    assert server.step == 5


def test_an_unrestorable_step_is_refused_without_touching_the_engine(server_factory, published):
    server, events = server_factory(RESTORE_FAILED)
    reply = server.load_weights(4)
    assert not reply["ok"] and reply["weights_step"] == 0 and server.step == 0
    assert "could not load weights step 4" in reply["message"]
    assert 4 in server.refused
    assert [e[0] for e in events] == ["build", "rpc"]
    assert not server.export_dir.exists()


def test_an_in_place_load_that_succeeds_resets_the_prefix_cache(server_factory, published):
    ok = {"ok": True, "restore_s": 0.1, "reload_s": 0.2, "num_bytes": 8}
    server, events = server_factory(ok)
    reply = server.load_weights(5)
    assert reply["ok"] and reply["mode"] == "in_place" and server.step == 5
    assert [e[0] for e in events] == ["build", "rpc", "reset_prefix_cache"]
    assert events[1][1:] == ("jaxsd_load_orbax_weights", "5")
