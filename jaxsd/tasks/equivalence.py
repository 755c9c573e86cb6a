"""Symbolic math-answer equivalence (`math-verify`, sympy) in worker processes with a hard
per-answer timeout.

sympy can run for hours on some inputs (`9^{9^{9^{9}}}` vs `2` never returns), and
math-verify's own timeouts use SIGALRM, which only works in a main thread and cannot stop
C code. So each comparison runs in a spawned worker process; one that passes its deadline is
killed and replaced, and the answer counts as not equal (with a line in the log).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import re
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

_READY = "ready"
_STARTUP_S = 120.0  # importing sympy + math-verify in a fresh process on a busy 2-core CPU

# Unicode math that LaTeX parsers do not read: √x, π, ·, ×, ∞, −.
_SQRT_UNICODE_RE = re.compile(r"√\s*(\{[^{}]*\}|\([^()]*\)|[0-9.]+|[A-Za-z])")
_UNICODE = {
    "π": "\\pi ",
    "·": "\\cdot ",
    "×": "\\times ",
    "∞": "\\infty ",
    "−": "-",
    "⋅": "\\cdot ",
}


def unicode_to_latex(answer: str) -> str:
    """`2√2` -> `2\\sqrt{2}`, `π·2` -> `\\pi \\cdot 2` (what a model writes outside LaTeX)."""

    def sqrt(m: re.Match) -> str:
        arg = m.group(1)
        return "\\sqrt{" + (arg[1:-1] if arg[0] in "{(" else arg) + "}"

    s = _SQRT_UNICODE_RE.sub(sqrt, answer)
    for char, latex in _UNICODE.items():
        s = s.replace(char, latex)
    return s


def symbolic_equal(predicted: str, gold: str) -> bool:
    """math-verify's verdict on two answer strings (no timeout: call it in a worker)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]

    def parsed(s: str):
        return parse(f"${unicode_to_latex(s)}$", extraction_config=configs, parsing_timeout=None)

    gold_p, pred_p = parsed(gold), parsed(predicted)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=None))


def _worker(conn: Connection) -> None:
    import logging

    logging.disable(logging.WARNING)  # math-verify warns on every call that timeouts are off
    symbolic_equal("1", "1")  # import and warm up before saying ready
    conn.send(_READY)
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(symbolic_equal(*job))
        except Exception:  # an unparsable answer is a wrong answer, not a crashed trainer
            conn.send(False)


class _Slot:
    """One worker process and its pipe; restarted after a timeout."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.proc = None

    def start(self) -> None:
        parent, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(_STARTUP_S) or parent.recv() != _READY:
            self.kill()
            raise RuntimeError(f"math-verify worker did not start within {_STARTUP_S:.0f} s")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
        if self.proc is not None:
            self.proc.join(timeout=5)
        self.kill()


class EquivalencePool:
    """`equal_many([(predicted, gold), ...])` over `workers` processes, each answer under a
    hard `timeout_s`; `timeouts` counts the answers that ran out of time (scored False)."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.timeout_s = timeout_s
        self.slots = [_Slot() for _ in range(workers)]
        self.timeouts = 0

    def equal_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Symbolic equality of each (predicted, gold) pair, in order."""
        results: list[bool] = [False] * len(pairs)
        todo = list(range(len(pairs)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # slot -> (pair index, deadline)
        while todo or busy:
            for s, slot in enumerate(self.slots):
                if s not in busy and todo:
                    if slot.conn is None:
                        slot.start()
                    i = todo.pop()
                    slot.conn.send(tuple(pairs[i]))
                    busy[s] = (i, time.monotonic() + self.timeout_s)
            deadline = min(d for _, d in busy.values())
            ready = wait([self.slots[s].conn for s in busy], max(deadline - time.monotonic(), 0))
            now = time.monotonic()
            for s, (i, d) in list(busy.items()):
                slot = self.slots[s]
                if slot.conn in ready:
                    try:
                        results[i] = bool(slot.conn.recv())
                    except EOFError:  # the worker died (e.g. out of memory): not equal
                        slot.kill()
                        print(f"[jaxsd] math-verify worker died on {pairs[i][0][:80]!r}")
                    del busy[s]
                elif now >= d:
                    slot.kill()  # the next job starts a fresh worker
                    del busy[s]
                    self.timeouts += 1
                    print(
                        f"[jaxsd] math-verify gave up after {self.timeout_s:g} s on "
                        f"{pairs[i][0][:80]!r} vs {pairs[i][1][:80]!r}: scored as not equal",
                        flush=True,
                    )
        return results

    def close(self) -> None:
        for slot in self.slots:
            slot.close()


_POOLS: dict[tuple[int, float], EquivalencePool] = {}


def shared_pool(workers: int = 2, timeout_s: float = 5.0) -> EquivalencePool:
    """One pool per (workers, timeout) per process, closed at exit."""
    key = (workers, timeout_s)
    if key not in _POOLS:
        if not _POOLS:
            atexit.register(lambda: [p.close() for p in _POOLS.values()])
        _POOLS[key] = EquivalencePool(workers, timeout_s)
    return _POOLS[key]
