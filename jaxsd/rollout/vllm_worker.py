"""vLLM worker extension: load a published Orbax weights step into the running engine in place.

vLLM mixes this class into its GPU/CPU worker when the engine is built with
`worker_extension_cls="jaxsd.rollout.vllm_worker.OrbaxWeightLoader"`; the rollout server then
calls `llm.collective_rpc("jaxsd_load_orbax_weights", args=(path, expected_shapes))`. Each
worker restores the checkpoint on its host and feeds the HF-named tensors to
`model_runner.reload_weights(..., is_checkpoint_format=True)`, which renames, shards and
repacks them exactly like a fresh load (the model's own `load_weights` skips the repacking
the CPU backend needs).

Nothing here raises into vLLM: failures come back as a status dict whose `stage` tells the
server whether the checkpoint was bad ("restore": the engine still holds the previous weights)
or the in-place load itself failed ("reload": the engine must be rebuilt).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Mapping

import numpy as np

from jaxsd.rollout.weights import CheckpointRestoreError, restore_checkpoint


def numpy_to_torch(arr: np.ndarray):
    """A torch tensor sharing `arr`'s memory; bfloat16 (ml_dtypes) goes through a uint16 view."""
    import torch

    if arr.dtype.name == "bfloat16":  # torch.from_numpy does not know ml_dtypes' bfloat16
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def check_state_dict(
    state: Mapping[str, np.ndarray], expected_shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise CheckpointRestoreError unless `state` has exactly the expected names and shapes."""
    missing = sorted(set(expected_shapes) - set(state))
    extra = sorted(set(state) - set(expected_shapes))
    wrong = [
        f"{k}: {tuple(state[k].shape)} != {tuple(expected_shapes[k])}"
        for k in sorted(set(state) & set(expected_shapes))
        if tuple(state[k].shape) != tuple(expected_shapes[k])
    ]
    if missing or extra or wrong:
        raise CheckpointRestoreError(
            f"weights do not fit the served model: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {extra[:5]} ({len(extra)} in all), "
            f"shape mismatches {wrong[:5]}; publish to_hf_state_dict() of the same architecture"
        )


def _tensors(state: Mapping[str, np.ndarray]) -> Iterator[tuple[str, object]]:
    for name, arr in state.items():
        yield name, numpy_to_torch(arr)


class OrbaxWeightLoader:
    """Methods vLLM adds to its worker (`self` is the worker: it has model_runner, vllm_config)."""

    def jaxsd_load_orbax_weights(
        self, checkpoint_path: str, expected_shapes: dict[str, tuple[int, ...]] | None = None
    ) -> dict:
        """Restore `checkpoint_path` on host and reload it into the model in place."""
        t0 = time.perf_counter()
        try:
            state = restore_checkpoint(checkpoint_path)
            if expected_shapes is not None:
                check_state_dict(state, expected_shapes)
        except Exception as e:  # the engine is untouched: report and keep serving
            return {"ok": False, "stage": "restore", "error": f"{type(e).__name__}: {e}"}
        t1 = time.perf_counter()
        try:
            from vllm.config import set_current_vllm_config

            with set_current_vllm_config(self.vllm_config):
                self.model_runner.reload_weights(
                    weights_iterator=_tensors(state), is_checkpoint_format=True
                )
        except Exception:  # weights may be half-replaced now; the server rebuilds the engine
            return {"ok": False, "stage": "reload", "error": traceback.format_exc()}
        return {
            "ok": True,
            "restore_s": t1 - t0,
            "reload_s": time.perf_counter() - t1,
            "num_bytes": int(sum(v.nbytes for v in state.values())),
        }
