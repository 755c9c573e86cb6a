"""Run model-written programs and their tests in a sandbox; never in the trainer's process.

Each program gets its own process (`jaxsd/tasks/sandbox_harness.py` under `python -I -S`) with:
- a wall-clock timeout (the whole process group is killed) and an RLIMIT_CPU limit;
- RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NPROC (no fork bombs), no core files;
- new network, PID and mount namespaces (`unshare --net --pid --mount-proc --kill-child`): no
  network at all, no view of the trainer's processes, fresh tmpfs over /tmp, /var/tmp and
  /dev/shm (the program's home and TMPDIR), and every process of the program dies with it;
- a uid of its own (root only; one per pool slot, so RLIMIT_NPROC counts only that program):
  it cannot write or delete the trainer's files, read their environment, or signal them;
- a fresh temporary working directory (removed afterwards), a clean environment, stdin empty;
- stdout/stderr read with a cap: the first `keep_bytes` are kept, more than `max_output_bytes`
  kills the program.

A program passes only when the harness's report carries this run's random nonce and says
"ok": exiting early, dying, or printing a fake verdict never passes (see the harness).

What the machine lacks is probed once and named in a warning; the sandbox then runs with what
is left (e.g. without `unshare` there is no network isolation).
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import functools
import json
import os
import pathlib
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

HARNESS = pathlib.Path(__file__).resolve().with_name("sandbox_harness.py")
SYSTEM_PYTHONS = ("/usr/bin/python3",)
_UID_BASE = 200_000  # sandbox uids: _UID_BASE + 1000 * (pid % 10_000) + slot (no real users)
MAX_WORKERS = 1000


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits; every field is a config key of the code tasks' `sandbox` dict."""

    timeout_s: float = 5.0  # wall clock from start to report
    cpu_s: int | None = None  # RLIMIT_CPU; None = ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS
    file_mb: int = 16  # RLIMIT_FSIZE
    max_procs: int = 16  # RLIMIT_NPROC (per sandbox uid)
    keep_bytes: int = 8192  # stdout / stderr kept for feedback
    max_output_bytes: int = 1 << 20  # more output than this is a failure

    def __post_init__(self) -> None:
        for key in ("timeout_s", "memory_mb", "file_mb", "max_procs", "keep_bytes"):
            if not getattr(self, key) > 0:
                raise ValueError(f"sandbox.{key}={getattr(self, key)!r} must be > 0")
        if self.max_output_bytes < self.keep_bytes:
            raise ValueError(
                f"sandbox.max_output_bytes={self.max_output_bytes} must be >= "
                f"sandbox.keep_bytes={self.keep_bytes}"
            )


@dataclasses.dataclass(frozen=True)
class Job:
    """One program and its tests. kind: "asserts" (Python test snippets, MBPP / HumanEval),
    "stdio" (input/output pairs) or "functional" (LeetCode-style calls of `func_name`)."""

    code: str
    tests: tuple[Any, ...]
    kind: str = "asserts"
    setup: str = ""
    func_name: str = ""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """Outcome of one program. `status`: passed | failed | timeout | output_limit | crashed."""

    status: str
    reason: str  # one line a human (and the self-teacher) can read
    failure: dict[str, Any] | None
    stdout: str
    stderr: str
    wall_s: float
    tests_passed: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What this machine allows; `missing` names each layer that is not available."""

    unshare: tuple[str, ...]  # launcher prefix, () without namespaces
    drop_uid: bool
    python: str
    missing: tuple[str, ...]

    @property
    def private_tmp(self) -> bool:
        """A mount namespace of our own: /tmp, /var/tmp, /dev/shm become fresh tmpfs."""
        return "--mount-proc" in self.unshare


def _works(cmd: Sequence[str]) -> bool:
    try:
        done = subprocess.run(list(cmd), capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@functools.lru_cache(maxsize=1)
def probe_isolation() -> Isolation:
    """Find the strongest isolation this machine allows; warn once naming what is missing."""
    missing = []
    launcher: tuple[str, ...] = ()
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    if unshare is None:
        missing.append("the `unshare` tool (util-linux): no network/PID namespaces")
    else:
        full = (unshare, "--net", "--pid", "--mount-proc", "--fork", "--kill-child")
        options = [full, (unshare, "--net", "--pid", "--fork", "--kill-child")]
        if not root:  # namespaces through a user namespace, as the unprivileged user
            options = [(o[0], "--map-root-user", *o[1:]) for o in options]
        for option in options:
            if _works([*option, "true"]):
                launcher = option
                break
        if not launcher:
            missing.append("working `unshare` namespaces (user namespaces disabled?)")
        elif "--mount-proc" not in launcher:
            missing.append("a mount namespace (private /proc, /tmp, /dev/shm)")
    python = sys.executable
    drop_uid = False
    if not root:
        missing.append("root: programs run as the trainer's user (no separate uid)")
    else:
        # The sandbox uid must be able to read the interpreter's standard library (a pyenv
        # Python under /root is not); try ours, then the system's.
        for candidate in (sys.executable, *SYSTEM_PYTHONS):
            if _readable_by_others(candidate):
                python, drop_uid = candidate, True
                break
        if not drop_uid:
            missing.append(
                f"a Python whose standard library other users can read (tried "
                f"{sys.executable}, {', '.join(SYSTEM_PYTHONS)}): programs run as root"
            )
    if missing:
        warnings.warn(
            "jaxsd sandbox runs with reduced isolation; missing: " + "; ".join(missing),
            RuntimeWarning,
            stacklevel=2,
        )
    return Isolation(launcher, drop_uid, python, tuple(missing))


def _readable_by_others(python: str) -> bool:
    """Can an unprivileged uid run `python` and import its standard library?"""
    if not os.path.exists(python):
        return False
    code = "import os; os.setgid(65534); os.setuid(65534); import encodings.idna, json, decimal"
    return _works([python, "-I", "-S", "-c", code])


class Sandbox:
    """Runs Jobs in sandboxed processes, `workers` at a time, from a thread pool.

    `run_many` is what verifiers call on a whole batch; threads only wait on child processes,
    so they run beside the trainer and the sampler without holding the GIL.
    """

    def __init__(self, limits: SandboxLimits | None = None, workers: int = 64) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"sandbox workers={workers} must be in [1, {MAX_WORKERS}]")
        self.limits = limits or SandboxLimits()
        self.isolation = probe_isolation()
        self.workers = workers
        self._root = pathlib.Path(tempfile.mkdtemp(prefix="jaxsd-sandbox-"))
        self._root.chmod(0o711)  # sandbox uids may enter their own folder, list nothing here
        self._slots: list[int] = list(range(workers))
        self._slot_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "jaxsd-sandbox")
        # A task's sandbox lives as long as the run; its folder goes even without close().
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._root), True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._cleanup()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_many(self, jobs: Sequence[Job]) -> list[ExecResult]:
        """Results in the order of `jobs`; the programs run `workers` at a time."""
        return list(self._pool.map(self.run, jobs))

    def run(self, job: Job) -> ExecResult:
        """Run one job in its own sandboxed process and judge it."""
        with self._slot_lock:
            slot = self._slots.pop()
        try:
            return self._run_in_slot(job, slot)
        finally:
            with self._slot_lock:
                self._slots.append(slot)

    def _run_in_slot(self, job: Job, slot: int) -> ExecResult:
        limits, iso = self.limits, self.isolation
        uid = _UID_BASE + 1000 * (os.getpid() % 10_000) + slot if iso.drop_uid else None
        workdir = pathlib.Path(tempfile.mkdtemp(dir=self._root))
        if uid is not None:
            os.chown(workdir, uid, uid)
        nonce = secrets.token_hex(16)
        result_r, result_w = os.pipe()
        payload = {
            "nonce": nonce, "result_fd": result_w, "uid": uid,
            "kind": job.kind, "code": job.code, "tests": list(job.tests),
            "setup": job.setup, "func_name": job.func_name,
            "cpu_s": limits.cpu_s or int(limits.timeout_s) + 2,
            "memory_bytes": limits.memory_mb << 20, "file_bytes": limits.file_mb << 20,
            "max_procs": limits.max_procs, "private_tmp": iso.private_tmp,
        }  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8"}  # fmt: skip
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                [*iso.unshare, iso.python, "-I", "-S", str(HARNESS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=workdir, env=env, start_new_session=True, pass_fds=(result_w,),
            )  # fmt: skip
            os.close(result_w)
            result_w = -1
            outcome = _collect(proc, json.dumps(payload).encode(), result_r, limits, t0)
        finally:
            if result_w >= 0:
                os.close(result_w)
            os.close(result_r)
            shutil.rmtree(workdir, ignore_errors=True)
        return _judge(outcome, nonce, limits, time.perf_counter() - t0)


@dataclasses.dataclass
class _Outcome:
    stdout: bytearray
    stderr: bytearray
    report: bytearray
    returncode: int | None = None
    timed_out: bool = False
    output_exceeded: bool = False


_REPORT_CAP = 1 << 16


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group; namespaces and PDEATHSIG take the rest."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(
    proc: subprocess.Popen, stdin: bytes, result_r: int, limits: SandboxLimits, t0: float
) -> _Outcome:
    """Feed the job, read stdout/stderr/report with caps until EOF or the deadline."""
    out = _Outcome(bytearray(), bytearray(), bytearray())
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the launcher died at once; judged from its exit status
    deadline = t0 + limits.timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out.stdout)
    sel.register(proc.stderr, selectors.EVENT_READ, out.stderr)
    sel.register(result_r, selectors.EVENT_READ, out.report)
    printed = 0
    try:
        while sel.get_map():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                out.timed_out = True
                break
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = key.data
                cap = _REPORT_CAP if buf is out.report else limits.keep_bytes
                buf += chunk[: max(cap - len(buf), 0)]
                if buf is not out.report:
                    printed += len(chunk)
                    if printed > limits.max_output_bytes:
                        out.output_exceeded = True
                        break
            if out.output_exceeded:
                break
    finally:
        sel.close()
        _kill_group(proc)  # leftovers (setsid'd children are killed with the namespace)
        proc.stdout.close()
        proc.stderr.close()
        out.returncode = proc.wait()
    return out


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _judge(out: _Outcome, nonce: str, limits: SandboxLimits, wall_s: float) -> ExecResult:
    """Turn what the process left into a verdict with a one-line reason."""
    stdout, stderr = _decode(out.stdout), _decode(out.stderr)

    def result(status: str, reason: str, failure: dict | None = None, passed: int = 0):
        return ExecResult(status, reason, failure, stdout, stderr, wall_s, passed)

    if out.timed_out:
        return result("timeout", f"time limit: no result within {limits.timeout_s:g} s (killed)")
    if out.output_exceeded:
        return result(
            "output_limit",
            f"output limit: printed more than {limits.max_output_bytes} bytes (killed)",
        )
    lines = _decode(out.report).split("\n", 3)
    if len(lines) == 4 and lines[0] == nonce:
        passed = int(lines[2]) if lines[2].isdigit() else 0
        if lines[1] == "ok":
            return result("passed", f"all {passed} tests passed", None, passed)
        try:  # the harness writes repr() of a dict of strings and ints
            failure = ast.literal_eval(lines[3])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            failure = None
        failure = failure if isinstance(failure, dict) else {"message": "tests failed"}
        return result("failed", str(failure.get("message", "tests failed")), failure)
    if lines[0] and lines[0] != nonce:
        return result("crashed", "the report did not carry this run's nonce (forged)")
    return result("crashed", _death_reason(out.returncode, stderr))


def _death_reason(returncode: int | None, stderr: str) -> str:
    """Why a process ended without a report (exit status, signal, or the error's last line)."""
    rc = returncode if returncode is not None else -1
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        why = {"SIGXCPU": " (CPU-time limit)", "SIGXFSZ": " (file-size limit)"}.get(str(name), "")
        return f"killed by {name}{why} before the tests finished"
    if rc == 0:
        return (
            "the process exited with code 0 before the tests finished "
            "(an early exit never counts as a pass)"
        )
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
    return f"the process exited with code {rc} before the tests finished" + (
        f": {tail[0][:200]}" if tail else ""
    )
