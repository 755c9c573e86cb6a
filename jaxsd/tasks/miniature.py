"""The miniature task family: arithmetic in difficulty bands, each record tagged with its band.

A band is one operation on operands 0..max_operand ("easy:+:9" = 1-digit sums). The bands of
the shipped `assets/miniature_base` are chosen so that its pass rate is near 1 on `easy`,
intermediate on `intermediate` and near 0 on `hard` (its README has the measured rates), so a
batch mixes saturated, informative and unsolved questions: what SC-SDPO's pass-rate weights
and DRIFT's routing and success buffer act on. Evaluation reports every metric per band
(`eval/mean@16/band=hard`).

Records are generated, not read: every problem of every band is enumerated and shuffled with
`seed`, then the first `test_size / len(bands)` of each band form "test" and the next
`train_size / len(bands)` form "train" (disjoint, balanced, identical for a seed).
"""

from __future__ import annotations

import os
import random
from typing import Any

from jaxsd.tasks.base import register_task
from jaxsd.tasks.synthetic import ARITHMETIC_SYSTEM, ArithmeticTask

DEFAULT_BANDS = "easy:+:9,intermediate:-:9,hard:*:9"
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse_bands(spec: str) -> list[tuple[str, str, int]]:
    """Parse "name:op:max_operand,..." into [(name, op, max_operand)] (ValueError names it)."""
    bands = []
    for entry in spec.split(","):
        parts = entry.strip().split(":")
        ok = len(parts) == 3 and parts[0] and parts[1] in _OPS and parts[2].isdigit()
        if not ok:
            raise ValueError(
                f"task.kwargs.bands entry {entry!r} must be name:op:max_operand with op in "
                f"{sorted(_OPS)} (e.g. {DEFAULT_BANDS!r})"
            )
        bands.append((parts[0], parts[1], int(parts[2])))
    names = [b[0] for b in bands]
    if len(set(names)) != len(names):
        raise ValueError(f"task.kwargs.bands={spec!r} names a band twice")
    return bands


def band_problems(name: str, op: str, hi: int) -> list[dict[str, Any]]:
    """Every problem `a op b` with 0 <= a, b <= hi, as records of band `name`."""
    return [
        {
            "system": ARITHMETIC_SYSTEM,
            "prompt": f"{a}{op}{b}=?",
            "answer": str(_OPS[op](a, b)),
            "band": name,
        }
        for a in range(hi + 1)
        for b in range(hi + 1)
    ]


class MiniatureTask(ArithmeticTask):
    """Arithmetic bands of controlled difficulty; the verifier is `arithmetic`'s."""

    def __init__(
        self, seed: int = 0, train_size: int = 240, test_size: int = 60, bands: str = DEFAULT_BANDS
    ) -> None:
        self.bands = parse_bands(bands)
        k = len(self.bands)
        for key, size in (("train_size", train_size), ("test_size", test_size)):
            if not isinstance(size, int) or size < k or size % k:
                raise ValueError(
                    f"task.kwargs.{key}={size!r} must be a positive multiple of the number "
                    f"of bands ({k}): each split holds the same number of questions per band"
                )
        smallest = min((hi + 1) ** 2 for _, _, hi in self.bands)
        if (train_size + test_size) // k > smallest:
            raise ValueError(
                f"task.kwargs: {(train_size + test_size) // k} questions per band asked "
                f"(train_size + test_size over {k} bands) but a band has only {smallest} "
                f"distinct problems; lower train_size/test_size or raise max_operand"
            )
        self.name = "miniature"
        self.seed = seed
        self._sizes = {"test": test_size // k, "train": train_size // k}
        self._splits: dict[str, list[dict[str, Any]]] | None = None

    def _generate(self) -> dict[str, list[dict[str, Any]]]:
        rng = random.Random(self.seed)
        out: dict[str, list[dict[str, Any]]] = {"test": [], "train": []}
        for name, op, hi in self.bands:
            problems = band_problems(name, op, hi)
            rng.shuffle(problems)
            start = 0
            for split, size in self._sizes.items():
                out[split] += problems[start : start + size]
                start += size
        for split, records in out.items():
            rng.shuffle(records)  # bands interleaved, so any prefix mixes them
            out[split] = [{**r, "id": f"{split}/{i}"} for i, r in enumerate(records)]
        return out

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Generated records of `split` ("train" or "test"), each with its "band"."""
        if split not in self._sizes:
            raise ValueError(f"miniature: split {split!r}; use 'train' or 'test'")
        if self._splits is None:
            self._splits = self._generate()
        return [dict(r) for r in self._splits[split]]


register_task("miniature", MiniatureTask)
