"""Where the trainer and the vLLM rollout workers run on a GPU node, from one config section.

Two layouts (`placement.mode`):

- "separate": the trainer owns `placement.trainer_gpus`, the workers own `placement.rollout_gpus`
  (disjoint), one worker per `rollout.vllm.tensor_parallel_size` consecutive rollout GPUs. Each
  side may use most of its GPUs' memory.
- "colocated": trainer and workers share the same GPUs. JAX preallocates
  `placement.trainer_memory_fraction` of each GPU and vLLM takes
  `rollout.vllm.gpu_memory_utilization`; both come out of one budget, so their sum must leave
  `COLOCATED_HEADROOM` free (CUDA contexts, NCCL buffers, fragmentation) or the config fails
  before anything starts. vLLM's sleep mode (weights offloaded, KV cache freed between
  rollouts) is on by default here, since the trainer needs the memory while it steps.

An empty GPU list means "whatever the process sees" (CPU machines, or a launcher that already
set CUDA_VISIBLE_DEVICES). Everything here is pure: it turns config values into environment
variables and per-worker settings; the loop applies them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MODES = ("separate", "colocated")
COLOCATED_HEADROOM = 0.05  # of each GPU's memory, left to CUDA contexts and fragmentation
JAX_MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


class PlacementError(ValueError):
    """A placement config that would overcommit or double-book GPUs; names the keys."""


@dataclasses.dataclass(frozen=True)
class Placement:
    mode: str
    trainer_gpus: tuple[int, ...]  # () = leave the trainer's visible devices as they are
    worker_gpus: tuple[tuple[int, ...], ...]  # one entry per vLLM worker (a TP group)
    trainer_memory_fraction: float
    gpu_memory_utilization: float  # vLLM's share of each of its GPUs
    sleep_between_rollouts: bool

    @property
    def num_workers(self) -> int:
        return len(self.worker_gpus)

    def trainer_env(self) -> dict[str, str]:
        """Environment for the trainer process, set before JAX initialises its backend."""
        env = {JAX_MEMORY_FRACTION_ENV: f"{self.trainer_memory_fraction:g}"}
        if self.trainer_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.trainer_gpus))
        return env

    def worker_env(self, index: int) -> tuple[tuple[str, str], ...]:
        """Extra environment of worker `index` (its GPUs), for `VllmWorkerConfig.env`."""
        gpus = self.worker_gpus[index]
        return (("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpus))),) if gpus else ()


def parse_gpus(text: str, key: str) -> tuple[int, ...]:
    """ "0-3" -> (0, 1, 2, 3); "0,2,5" -> (0, 2, 5); "" -> (). Errors name `key`."""
    gpus: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                gpus.extend(range(lo, hi + 1))
            else:
                gpus.append(int(part))
        except ValueError:
            raise PlacementError(
                f"{key}={text!r}: {part!r} is not a GPU index or range; write e.g. '0-3' or '0,2'"
            ) from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise PlacementError(f"{key}={text!r}: GPU indices must be >= 0 and listed once")
    return tuple(gpus)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise PlacementError(f"{key}={value!r}: use a fraction of GPU memory in (0, 1)")
    return float(value)


def resolve_placement(
    *,
    mode: str,
    trainer_gpus: str,
    rollout_gpus: str,
    trainer_memory_fraction: float,
    gpu_memory_utilization: float,
    tensor_parallel_size: int,
    sleep_between_rollouts: bool | None,
) -> Placement:
    """Check a placement config and turn it into a `Placement`; every error names its keys."""
    if mode not in MODES:
        raise PlacementError(f"placement.mode={mode!r}; use one of {MODES}")
    tp = tensor_parallel_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise PlacementError(f"rollout.vllm.tensor_parallel_size={tp!r}; use an integer >= 1")
    trainer = parse_gpus(trainer_gpus, "placement.trainer_gpus")
    rollout = parse_gpus(rollout_gpus, "placement.rollout_gpus")
    jax_share = _fraction(trainer_memory_fraction, "placement.trainer_memory_fraction")
    vllm_share = _fraction(gpu_memory_utilization, "rollout.vllm.gpu_memory_utilization")
    if mode == "separate":
        shared = sorted(set(trainer) & set(rollout))
        if shared:
            raise PlacementError(
                f"placement.mode='separate' but GPUs {shared} are in both placement.trainer_gpus="
                f"{trainer_gpus!r} and placement.rollout_gpus={rollout_gpus!r}; make them "
                "disjoint, or use placement.mode='colocated' to share GPUs"
            )
    else:
        if trainer and rollout and trainer != rollout:
            raise PlacementError(
                f"placement.mode='colocated' shares GPUs, but placement.trainer_gpus="
                f"{trainer_gpus!r} != placement.rollout_gpus={rollout_gpus!r}; list the same "
                "GPUs (or leave rollout_gpus empty to use the trainer's)"
            )
        rollout = rollout or trainer
        budget = 1.0 - COLOCATED_HEADROOM
        if jax_share + vllm_share > budget + 1e-9:
            raise PlacementError(
                f"placement.mode='colocated' overcommits each GPU: placement."
                f"trainer_memory_fraction={jax_share:g} + rollout.vllm.gpu_memory_utilization="
                f"{vllm_share:g} = {jax_share + vllm_share:g} > {budget:g} (1 minus "
                f"{COLOCATED_HEADROOM:g} headroom); lower one of them"
            )
    if rollout and len(rollout) % tp:
        raise PlacementError(
            f"placement.rollout_gpus={rollout_gpus!r} lists {len(rollout)} GPUs, not a multiple "
            f"of rollout.vllm.tensor_parallel_size={tp}: each worker takes {tp} GPUs"
        )
    groups = tuple(rollout[i : i + tp] for i in range(0, len(rollout), tp)) or ((),)
    if sleep_between_rollouts is None:
        sleep_between_rollouts = mode == "colocated"
    return Placement(
        mode=mode,
        trainer_gpus=trainer,
        worker_gpus=groups,
        trainer_memory_fraction=jax_share,
        gpu_memory_utilization=vllm_share,
        sleep_between_rollouts=bool(sleep_between_rollouts),
    )


def placement_from_config(cfg: Any) -> Placement:
    """`resolve_placement` on a run config's `placement` and `rollout.vllm` sections."""
    sleep = cfg.rollout.vllm.sleep_between_rollouts
    return resolve_placement(
        mode=cfg.placement.mode,
        trainer_gpus=cfg.placement.trainer_gpus,
        rollout_gpus=cfg.placement.rollout_gpus,
        trainer_memory_fraction=cfg.placement.trainer_memory_fraction,
        gpu_memory_utilization=cfg.rollout.vllm.gpu_memory_utilization,
        tensor_parallel_size=cfg.rollout.vllm.tensor_parallel_size,
        sleep_between_rollouts=None if sleep == "auto" else sleep,
    )


def apply_trainer_env(placement: Placement, environ: dict[str, str]) -> list[str]:
    """Set the trainer's GPU list and JAX memory share in `environ` (os.environ) before JAX
    initialises its backend; returns a line per setting that replaced a different value."""
    replaced = []
    for key, value in placement.trainer_env().items():
        old = environ.get(key)
        if old is not None and old != value:
            replaced.append(f"{key}={old!r} -> {value!r} (from the placement config)")
        environ[key] = value
    return replaced
