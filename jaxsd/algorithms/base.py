"""Host-side types shared by every algorithm: verified rollouts in, per-rollout plans out.

An algorithm turns the verified rollouts of one step (grouped by question) into the
per-rollout numbers of the train step's batch (`jaxsd.train.batch`): the teacher's chat
messages (tokenised later by the loop) and its `LossWeights` (the GRPO advantage and the
weight of each loss term). Its memory between steps is an explicit `HostState` of its own type
(DRIFT's `DriftState`, PACED's `PacedState`; the plain `HostState` holds nothing) that
round-trips through JSON, so a checkpoint restores it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

Message = dict[str, str]  # one chat message: {"role": ..., "content": ...}

# Routing labels (metrics): which branch of the objective a rollout feeds.
ROUTE_NONE = "none"  # no loss term at all
ROUTE_SD = "sd"  # distillation (SDPO-style self-teacher)
ROUTE_PG = "pg"  # clipped surrogate (GRPO)
ROUTE_PG_SSOPD = "pg+ssopd"  # GRPO plus SSOPD's clipped forward KL on its prefix
ROUTES = (ROUTE_NONE, ROUTE_SD, ROUTE_PG, ROUTE_PG_SSOPD)

# Where a teacher context came from (metrics).
SOURCE_NONE = "none"
SOURCE_SOLUTION = "solution"  # a successful sibling rollout of the same group
SOURCE_FEEDBACK = "feedback"  # this rollout's environment feedback (SDPO, no solution)
SOURCE_BUFFER = "buffer"  # DRIFT's success buffer (no success in the group)
SOURCE_PRIVILEGED = "privileged"  # SSOPD's privileged context with y+
SOURCES = (SOURCE_NONE, SOURCE_SOLUTION, SOURCE_FEEDBACK, SOURCE_BUFFER, SOURCE_PRIVILEGED)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One verified rollout of a question (the verifier's reward and feedback attached)."""

    question_id: str
    prompt: Sequence[Message]  # chat messages of the student prompt
    response: str  # decoded response text
    response_ids: Sequence[int]  # sampled response token ids
    logprobs: np.ndarray  # [len(response_ids)] rollout engine's sampled-token log-probs
    reward: float
    feedback: str | None = None  # environment feedback text (None or "" = none)
    entropy: float | None = None  # mean token entropy of the response (DRIFT warm-up)

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.reward)):
            raise ValueError(
                f"rollout of question {self.question_id!r} has reward={self.reward}; the "
                "verifier must return a finite number"
            )
        if len(self.logprobs) != len(self.response_ids):
            raise ValueError(
                f"rollout of question {self.question_id!r}: logprobs has {len(self.logprobs)} "
                f"entries but response_ids has {len(self.response_ids)}; pass one log-prob per "
                "sampled token"
            )

    @property
    def length(self) -> int:
        """Response length in tokens."""
        return len(self.response_ids)

    @property
    def mean_logprob(self) -> float:
        """Mean sampled-token log-prob (length-normalised; 0 for an empty response)."""
        return float(np.mean(self.logprobs)) if self.length else 0.0


@dataclasses.dataclass(frozen=True)
class Group:
    """The G rollouts of one question in one step."""

    question_id: str
    rollouts: tuple[Rollout, ...]

    def __post_init__(self) -> None:
        if not self.rollouts:
            raise ValueError(f"group of question {self.question_id!r} has no rollouts")
        others = {r.question_id for r in self.rollouts} - {self.question_id}
        if others:
            raise ValueError(
                f"group of question {self.question_id!r} holds rollouts of {sorted(others)}; "
                "group rollouts by question_id (see `group_rollouts`)"
            )

    @property
    def rewards(self) -> np.ndarray:
        """Rewards `[G]` as float64."""
        return np.asarray([r.reward for r in self.rollouts], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.rollouts)


def groups_to_json(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Verified groups as JSON rows (a checkpoint keeps the batch sampled ahead, async mode)."""
    return [
        {
            "question_id": r.question_id,
            "prompt": [dict(m) for m in r.prompt],
            "response": r.response,
            "response_ids": [int(t) for t in r.response_ids],
            "logprobs": np.asarray(r.logprobs, np.float32).tolist(),
            "reward": float(r.reward),
            "feedback": r.feedback,
            "entropy": None if r.entropy is None else float(r.entropy),
        }
        for r in flat_rollouts(groups)
    ]


def groups_from_json(rows: Sequence[Mapping[str, Any]]) -> list[Group]:
    """Inverse of `groups_to_json`: the same groups, log-probs bit-exact (float32)."""
    rollouts = [
        Rollout(**{**row, "logprobs": np.asarray(row["logprobs"], np.float32)}) for row in rows
    ]
    return group_rollouts(rollouts)


def group_rollouts(rollouts: Sequence[Rollout]) -> list[Group]:
    """Group a flat list by question_id, keeping first-appearance order of questions."""
    by_question: dict[str, list[Rollout]] = {}
    for rollout in rollouts:
        by_question.setdefault(rollout.question_id, []).append(rollout)
    return [Group(q, tuple(rs)) for q, rs in by_question.items()]


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The numbers an algorithm sets per rollout for the train step's loss terms (batch
    contract: each becomes one [B] array of `jaxsd.train.batch.TrainBatch`)."""

    advantage: float = 0.0  # GRPO advantage, broadcast over the rollout's tokens
    pg_weight: float = 0.0  # clipped-surrogate weight (0 = off; DRIFT gamma, routing)
    sd_weight: float = 0.0  # distillation weight (SC-SDPO/PACED/filter weight)
    ssopd_weight: float = 0.0  # SSOPD omega_i
    ssopd_len: int = 0  # first L response tokens distilled by SSOPD
    rhythm_beta: float = 0.0  # DRIFT beta_i (1 = rhythm gate on the surrogate)


NO_LOSS = LossWeights()  # every term off


@dataclasses.dataclass(frozen=True)
class RolloutPlan:
    """What the train step does with one rollout: its teacher chat and its loss weights."""

    teacher_messages: list[Message] | None = None  # reprompt chat; None -> no teacher row
    weights: LossWeights = NO_LOSS
    route: str = ROUTE_NONE  # metrics label, one of ROUTES
    teacher_source: str = SOURCE_NONE  # metrics label, one of SOURCES


# Checkpoints written before each method had its own state type hold one record with all of
# these keys; a state type reads its own keys and accepts the others only at these values
# (what a method that did not use them left there), so those checkpoints resume unchanged.
_SHARED_RECORD_EMPTY: dict[str, Any] = {
    "ema_pass_rates": {},
    "success_buffer": {},
    "frozen_pass_rates": {},
    "rng_state": None,
    "num_plans": 0,
}


@dataclasses.dataclass(frozen=True)
class HostState:
    """What an algorithm remembers between steps; saved with every checkpoint as JSON.

    This base remembers nothing (the stateless methods use it as is). A method with memory
    subclasses it, one JSON key per field of the same name (`record` / `from_record`), and
    names the subclass as its `state_type`.
    """

    def record(self) -> dict[str, Any]:
        """The fields as JSON values (str keys, lists)."""
        return {}

    @classmethod
    def from_record(cls, raw: Mapping[str, Any]) -> HostState:
        """Inverse of `record`; a missing or mistyped field raises (KeyError/TypeError/...)."""
        return cls()

    def to_json(self) -> str:
        """Serialise exactly (floats round-trip through `repr`)."""
        return json.dumps(self.record(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HostState:
        """Inverse of `to_json`; a malformed record, or another method's, raises naming it."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError(f"a JSON {type(raw).__name__}, expected an object")
        except (TypeError, json.JSONDecodeError) as err:
            raise _malformed(cls, err) from err
        own = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(raw) - own):
            if key not in _SHARED_RECORD_EMPTY or raw[key] != _SHARED_RECORD_EMPTY[key]:
                raise ValueError(
                    f"algorithm host state holds {key!r}, which {cls.__name__} does not keep: "
                    "the checkpoint was written by another algorithm; resume it with the "
                    "algorithm.name that wrote it, or train into a new run folder"
                )
        try:
            return cls.from_record(raw)
        except (KeyError, TypeError, ValueError) as err:
            raise _malformed(cls, err) from err


def _malformed(cls: type[HostState], err: Exception) -> ValueError:
    return ValueError(
        f"algorithm host state is malformed ({type(err).__name__}: {err}); expected the JSON "
        f"written by {cls.__name__}.to_json (restore it from an intact checkpoint)"
    )


SampleAll = Callable[[], Sequence["Group"]]


class Algorithm(Protocol):
    """A method of METHODS.md, host side: verified groups -> per-rollout plans."""

    name: str
    state_type: ClassVar[type[HostState]]  # its memory's type; checkpoints restore through it
    success_threshold: float  # reward >= this counts as solved (pass rates, metrics)

    def init_state(self, seed: int) -> HostState:
        """The state before the first step."""
        ...

    def step_switches(self) -> dict[str, Any]:
        """Static switches of the train-step factory this method needs."""
        ...

    def before_training(self, state: HostState, sample_all: SampleAll) -> HostState:
        """The state for step 0 of a fresh run; `sample_all()` rolls out and verifies every
        training question once (PACED's offline pass). Most methods need nothing."""
        ...

    def plan(
        self, groups: Sequence[Group], state: HostState, *, epoch: int
    ) -> tuple[list[RolloutPlan], HostState, dict[str, float]]:
        """Plans in group-major order (group 0's rollouts first), new state, metrics."""
        ...


def flat_rollouts(groups: Sequence[Group]) -> list[Rollout]:
    """Rollouts in the order `plan` returns their plans (group-major)."""
    return [r for g in groups for r in g.rollouts]


def check_epoch(epoch: int) -> None:
    """Epochs count from 0; a negative epoch is a loop bug."""
    if epoch < 0:
        raise ValueError(f"epoch={epoch} is negative; pass the 0-based data epoch")
