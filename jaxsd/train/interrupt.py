"""Ctrl-C during training: finish the step in progress, save a checkpoint, exit cleanly.

The train state is donated to the jitted step, so stopping in the middle of a step would leave
nothing valid to save; the first SIGINT only raises a flag that the loop reads between steps.
A second SIGINT aborts at once (Python's default: KeyboardInterrupt, no save).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any


class GracefulStop:
    """`stop.requested` turns True on the first SIGINT between `install()` and `restore()`."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        # The next Ctrl-C interrupts immediately.
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        print(
            "\n[jaxsd] Ctrl-C: finishing the current step, then saving a checkpoint "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def install(self) -> None:
        """Catch SIGINT (signal handlers can only be set from the main thread; elsewhere
        Ctrl-C keeps its default)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        """Put the previous SIGINT handler back (safe to call twice)."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __enter__(self) -> GracefulStop:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def maybe_inject_crash(step: int) -> None:
    """Crash tests: JAXSD_FAULT_KILL_AT_STEP=n SIGKILLs this process in the middle of step n
    (1-based), after its rollouts and before its update, as a node failure would."""
    kill_at = os.environ.get("JAXSD_FAULT_KILL_AT_STEP")
    if kill_at is not None and int(kill_at) == step + 1:
        os.kill(os.getpid(), signal.SIGKILL)


def close_all(*parts: Any) -> None:
    """Close each part in order (checkpoints first: they may still be writing)."""
    for part in parts:
        part.close()


def close_on_error(*parts: Any) -> None:
    """Close Orbax and the engine while an error propagates, without burying it.

    A checkpointer left open keeps Orbax's threads and event loop alive into interpreter
    shutdown, which then prints pages of "Event loop is closed" after the real error; a
    failure while closing is reported in one line and the original error stays the last
    thing printed.
    """
    for part in parts:
        try:
            part.close()
        except Exception as err:  # the error in flight is the one to report
            print(f"[jaxsd] while stopping after an error, {type(part).__name__}.close() "
                  f"failed too: {type(err).__name__}: {str(err)[:300]}", flush=True)  # fmt: skip
