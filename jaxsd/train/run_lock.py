"""An exclusive lock on a run folder for the lifetime of the run that writes it.

Two runs on one `run_dir` would overwrite each other's metrics and mix their checkpoints.
`lock_run_dir` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `<run_dir>/.lock`; the kernel drops
the lock when the process exits however it exits (SIGKILL included), so no stale lock is left
behind and nothing has to be cleaned up by hand. The file holds the holder's pid and host, so a
second run refuses at once and says who holds the folder. (flock is advisory and per host:
on a network file system shared by several hosts it may not exclude a run on another host.)
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket

LOCK_NAME = ".lock"


class RunDirLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """A held lock on a run folder; `release()` (or process exit) frees it."""

    def __init__(self, path: pathlib.Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(path: pathlib.Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid and host are not recorded yet)"


def lock_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Take the run folder's lock or raise RunDirLockedError naming the folder and holder."""
    folder = pathlib.Path(run_dir).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirLockedError(
            f"run_dir {folder} is in use by {_holder(path)}; two runs on one folder overwrite "
            "each other. Wait for that run to finish (or stop it), or pick another "
            "--config.run_dir"
        ) from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return RunLock(path, fd)
