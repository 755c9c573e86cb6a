"""GPU placement of trainer and vLLM workers, what each worker passes to `vllm.LLM`, the worker
pool, and RAM-backed weight publishing (jaxsd.rollout.placement / worker_pool / weights).

vLLM has no GPU build on our test machines, so the GPU-only arguments are checked as the
keyword arguments and flags we hand to vLLM, not by starting it on a GPU."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from configs import base
from jaxsd.rollout import vllm_server
from jaxsd.rollout.engine import RolloutResult, RolloutWorkerError, SamplingConfig
from jaxsd.rollout.placement import (
    PlacementError,
    apply_trainer_env,
    parse_gpus,
    placement_from_config,
    resolve_placement,
)
from jaxsd.rollout.sync import SyncConfig, WeightSync
from jaxsd.rollout.vllm_engine import VllmWorkerConfig, worker_command
from jaxsd.rollout.vllm_server import WorkerOptions, llm_kwargs, parse_options
from jaxsd.rollout.weights import WeightsDirError, resolve_weights_dir
from jaxsd.rollout.worker_pool import WorkerPool, split_evenly
from jaxsd.train.validate import validate_config


def _placement(**overrides):
    kwargs = dict(mode="separate", trainer_gpus="", rollout_gpus="", trainer_memory_fraction=0.75,
                  gpu_memory_utilization=0.9, tensor_parallel_size=1, sleep_between_rollouts=None)
    return resolve_placement(**(kwargs | overrides))  # fmt: skip


@pytest.mark.parametrize("text, gpus", [("", ()), ("0-3", (0, 1, 2, 3)), ("4,6, 7", (4, 6, 7)),
                                        ("0-1,5", (0, 1, 5))])  # fmt: skip
def test_parse_gpus(text, gpus):
    assert parse_gpus(text, "k") == gpus


@pytest.mark.parametrize("text", ["a", "3-1", "0,0", "-1", "1-x"])
def test_parse_gpus_rejects_bad_lists_naming_the_key(text):
    with pytest.raises(PlacementError, match="placement.rollout_gpus"):
        parse_gpus(text, "placement.rollout_gpus")


def test_separate_gpus_split_into_one_worker_per_tensor_parallel_group():
    p = _placement(trainer_gpus="0-3", rollout_gpus="4-7", tensor_parallel_size=2)
    assert p.worker_gpus == ((4, 5), (6, 7)) and p.num_workers == 2
    assert p.trainer_env() == {"CUDA_VISIBLE_DEVICES": "0,1,2,3",
                               "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.75"}  # fmt: skip
    assert p.worker_env(1) == (("CUDA_VISIBLE_DEVICES", "6,7"),)
    assert not p.sleep_between_rollouts  # separate GPUs: nothing to give back


def test_no_gpu_lists_mean_one_worker_on_what_the_process_sees():
    p = _placement()
    assert p.worker_gpus == ((),) and p.worker_env(0) == ()
    assert "CUDA_VISIBLE_DEVICES" not in p.trainer_env()


@pytest.mark.parametrize("overrides, keys", [
    (dict(trainer_gpus="0-3", rollout_gpus="3-4"),
     ("placement.trainer_gpus", "placement.rollout_gpus")),
    (dict(mode="colocated", trainer_memory_fraction=0.75, gpu_memory_utilization=0.9),
     ("placement.trainer_memory_fraction", "rollout.vllm.gpu_memory_utilization")),
    (dict(mode="colocated", trainer_gpus="0,1", rollout_gpus="2,3"), ("placement.rollout_gpus",)),
    (dict(rollout_gpus="4-6", tensor_parallel_size=2), ("rollout.vllm.tensor_parallel_size",)),
    (dict(mode="shared"), ("placement.mode",)),
    (dict(tensor_parallel_size=0), ("rollout.vllm.tensor_parallel_size",)),
    (dict(gpu_memory_utilization=1.2), ("rollout.vllm.gpu_memory_utilization",)),
])  # fmt: skip
def test_bad_placements_fail_naming_their_keys(overrides, keys):
    with pytest.raises(PlacementError) as err:
        _placement(**overrides)
    for key in keys:
        assert key in str(err.value)


def test_colocated_shares_one_memory_budget_and_sleeps_by_default():
    p = _placement(mode="colocated", trainer_gpus="0-1", trainer_memory_fraction=0.45,
                   gpu_memory_utilization=0.5)  # fmt: skip
    assert p.worker_gpus == ((0,), (1,))  # rollout_gpus "" = the trainer's GPUs
    assert p.sleep_between_rollouts
    assert p.trainer_env()["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45"
    assert not _placement(mode="colocated", trainer_memory_fraction=0.45,
                          gpu_memory_utilization=0.5, sleep_between_rollouts=False
                          ).sleep_between_rollouts  # fmt: skip


def test_apply_trainer_env_reports_what_it_replaced():
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", "OTHER": "x"}
    replaced = apply_trainer_env(_placement(trainer_gpus="2"), env)
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.75", "CUDA_VISIBLE_DEVICES": "2",
                   "OTHER": "x"}  # fmt: skip
    assert len(replaced) == 1 and "0.9" in replaced[0]


def test_config_defaults_and_validation_reach_the_placement():
    cfg = base.get_config("qwen3_8b")
    p = placement_from_config(cfg)
    assert p.num_workers == 1 and not p.sleep_between_rollouts
    cfg.placement.mode = "colocated"  # 0.75 + 0.9 of every GPU
    with pytest.raises(ValueError, match="overcommits"):
        validate_config(cfg)
    cfg.placement.trainer_memory_fraction, cfg.rollout.vllm.gpu_memory_utilization = 0.4, 0.5
    validate_config(cfg)
    cfg.rollout.vllm.dtype = "fp8"
    with pytest.raises(ValueError, match="rollout.vllm.dtype"):
        validate_config(cfg)


def _options(**overrides) -> WorkerOptions:
    return WorkerOptions(name="w", model_dir="/m", weights_dir="/w", address_file="/a",
                         parent_pid=1, **overrides)  # fmt: skip


def test_llm_kwargs_on_gpu_carry_dtype_parallelism_memory_and_sleep_mode():
    opts = _options(dtype="bfloat16", tensor_parallel_size=4, gpu_memory_utilization=0.5,
                    sleep_between_rollouts=True)  # fmt: skip
    kwargs = llm_kwargs("/m", opts, on_cpu=False)
    assert kwargs["dtype"] == "bfloat16" and kwargs["tensor_parallel_size"] == 4
    assert kwargs["gpu_memory_utilization"] == 0.5 and kwargs["enable_sleep_mode"] is True
    assert "enable_chunked_prefill" not in kwargs
    cpu = llm_kwargs("/m", opts, on_cpu=True)
    assert cpu["enable_chunked_prefill"] is False
    assert "enable_sleep_mode" not in cpu and "gpu_memory_utilization" not in cpu


def test_llm_kwargs_are_arguments_vllm_llm_accepts():
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    accepted = set(inspect.signature(LLM.__init__).parameters) | set(
        EngineArgs.__dataclass_fields__
    )
    kwargs = llm_kwargs("/m", _options(sleep_between_rollouts=True), on_cpu=False)
    assert set(kwargs) <= accepted, set(kwargs) - accepted


def test_worker_flags_round_trip_into_the_workers_options(tiny_model_dir, tmp_path):
    config = VllmWorkerConfig(model_dir=str(tiny_model_dir), weights_dir=str(tmp_path / "w"),
                              dtype="bfloat16", tensor_parallel_size=2,
                              gpu_memory_utilization=0.45, sleep_between_rollouts=True)  # fmt: skip
    argv = worker_command(config, tmp_path / "address.json")
    opts = parse_options(argv[2:])
    assert (opts.dtype, opts.tensor_parallel_size, opts.gpu_memory_utilization) == (
        "bfloat16", 2, 0.45)  # fmt: skip
    assert opts.sleep_between_rollouts is True


class _SleepyLLM:
    def __init__(self, events):
        self.events, self.llm_engine, self.engine_core = events, self, self

    def sleep(self, level):
        self.events.append(f"sleep{level}")

    def wake_up(self):
        self.events.append("wake")

    def collective_rpc(self, method, args):
        self.events.append("load")
        return [{"ok": False, "stage": "restore", "error": "missing"}]

    def shutdown(self):
        self.events.append("shutdown")


@pytest.mark.parametrize("sleeps, expected", [(True, ["sleep1", "wake", "load", "sleep1"]),
                                              (False, ["load"])])  # fmt: skip
def test_server_sleeps_between_requests_only_in_sleep_mode(tiny_model_dir, tmp_path, monkeypatch,
                                                           sleeps, expected):  # fmt: skip
    events = []
    monkeypatch.setattr(vllm_server, "build_llm", lambda d, opts: _SleepyLLM(events))
    monkeypatch.setattr(vllm_server, "on_cpu_platform", lambda: False)
    server = vllm_server.RolloutServer(WorkerOptions(
        name="w", model_dir=str(tiny_model_dir), weights_dir=str(tmp_path), address_file="/a",
        parent_pid=1, sleep_between_rollouts=sleeps))  # fmt: skip
    reply = server.handle({"type": "load_weights", "step": 3})
    assert reply["ok"] is False  # the fake refuses; the engine still goes back to sleep
    assert events == expected
    assert server.handle({"type": "ping"})["type"] == "pong" and events == expected


class _FakeWorker:
    """Answers each prompt p with n samples [p[0], j] tagged with its weights step."""

    def __init__(self, step=0):
        self.weights_step, self.calls, self.closed = step, [], False
        self.follow_latest = False

    def submit(self, prompts, n, sampling, timeout_s=None):
        self.calls.append(len(prompts))
        tokens = [np.array([p[0], j], np.int32) for p in prompts for j in range(n)]
        result = RolloutResult(
            token_ids=tokens, logprobs=[np.zeros(2, np.float32)] * len(tokens),
            finish_reasons=["length"] * len(tokens),
            prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
            weights_step=self.weights_step,
        )  # fmt: skip
        return type("Pending", (), {"result": lambda _self: result})()

    def load_weights(self, step):
        self.weights_step = step
        return step

    def close(self):
        self.closed = True


def test_split_evenly_covers_everything_in_order():
    for items in range(1, 12):
        for parts in range(1, 5):
            shares = split_evenly(items, parts)
            assert [i for s in shares for i in s] == list(range(items))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1 and all(shares)


def test_worker_pool_fans_out_and_joins_in_prompt_order():
    workers = [_FakeWorker(), _FakeWorker(), _FakeWorker()]
    pool = WorkerPool(workers)
    prompts = [[10 + i] for i in range(7)]
    result = pool.generate(prompts, 2, SamplingConfig(max_new_tokens=2))
    assert [w.calls for w in workers] == [[3], [2], [2]]
    assert result.prompt_index == [i for i in range(7) for _ in range(2)]
    assert [int(t[0]) for t in result.token_ids] == [10 + i for i in range(7) for _ in range(2)]
    assert pool.load_weights(5) == 5 and pool.weights_step == 5
    workers[0].weights_step = 4
    with pytest.raises(RolloutWorkerError, match="different weights steps"):
        pool.generate(prompts, 1, SamplingConfig(max_new_tokens=2))
    pool.close()
    assert all(w.closed for w in workers)


def test_weights_dir_auto_is_a_per_run_ram_folder_with_room(tmp_path):
    ram = tmp_path / "shm"
    ram.mkdir()
    folder, in_ram = resolve_weights_dir("auto", tmp_path / "run", bytes_per_step=1000, keep=3,
                                         ram_root=ram)  # fmt: skip
    assert in_ram and folder.parent.parent == ram and folder.name == "weights"
    other, _ = resolve_weights_dir("auto", tmp_path / "run2", bytes_per_step=1000, keep=3,
                                   ram_root=ram)  # fmt: skip
    assert other != folder  # two runs on one machine never share a folder
    with pytest.raises(WeightsDirError, match="rollout.weights_dir=run"):
        resolve_weights_dir("auto", tmp_path / "run", bytes_per_step=2**60, keep=3, ram_root=ram)
    with pytest.raises(WeightsDirError, match="does not have"):
        resolve_weights_dir("auto", tmp_path / "run", bytes_per_step=1, keep=3,
                            ram_root=tmp_path / "absent")  # fmt: skip


def test_weights_dir_run_explicit_and_multi_process(tmp_path):
    run = tmp_path / "run"
    assert resolve_weights_dir("run", run, bytes_per_step=1, keep=3) == (run / "weights", False)
    assert resolve_weights_dir("auto", run, bytes_per_step=1, keep=3, num_processes=2) == (
        run / "weights", False)  # fmt: skip
    assert resolve_weights_dir(str(tmp_path / "nfs"), run, bytes_per_step=1, keep=3) == (
        tmp_path / "nfs", False)  # fmt: skip


def test_scratch_weights_folder_is_emptied_at_start_and_removed_at_close(tmp_path):
    root = tmp_path / "jaxsd-abc"
    (root / "weights" / "7").mkdir(parents=True)  # a killed run's step
    (root / "hf_export_rollout-0").mkdir()
    sync = WeightSync(_FakeWorker(), SyncConfig(weights_dir=root / "weights", scratch=True))
    assert not root.exists()
    sync.after_step(1, lambda: {"w": np.ones(3, np.float32)})
    assert (root / "weights" / "1").is_dir()
    sync.close()
    assert not root.exists()
    kept = tmp_path / "disk" / "weights"
    disk = WeightSync(_FakeWorker(), SyncConfig(weights_dir=kept))
    disk.after_step(1, lambda: {"w": np.ones(3, np.float32)})
    disk.close()
    assert (kept / "1").is_dir()  # a folder the user chose is never removed
    assert pathlib.Path(root).parent.exists()
