"""What the rollout worker process is told, and what it tells vLLM.

`WorkerOptions` is everything the worker needs; `vllm_engine.worker_command` writes it as
`--<field>=<value>` flags and `parse_options` reads them back. `llm_kwargs` and
`sampling_params` map the options and a request's `SamplingConfig` onto vLLM's arguments
(`vllm.LLM`, `SamplingParams`); both are pure, so tests check them without an engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from jaxsd.rollout.engine import SamplingConfig

EXTENSION_CLS = "jaxsd.rollout.vllm_worker.OrbaxWeightLoader"


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """Everything the worker process needs; the client passes it as command-line flags."""

    name: str
    model_dir: str  # HF folder: architecture, and the weights of `initial_step`
    weights_dir: str  # the trainer's published Orbax steps
    address_file: str  # where the worker writes {"host", "port", "pid"} for the client
    parent_pid: int  # the trainer; the worker exits when it is gone
    initial_step: int = 0
    follow_latest: bool = False  # before each generate, load a newer published step if any
    reload_mode: str = "in_place"  # "restart": always rebuild the engine from an export
    export_dir: str = ""  # restart fallback's HF folders (default: <weights_dir>/../hf_export)
    dtype: str = "float32"
    max_model_len: int = 2048
    seed: int = 0
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    sleep_between_rollouts: bool = False  # vLLM sleep mode around each generate (GPU only)
    heartbeat_s: float = 1.0  # period of the heartbeats sent while a request runs


def parse_options(argv: list[str] | None = None) -> WorkerOptions:
    """`WorkerOptions` from the flags `vllm_engine.worker_command` writes."""
    parser = argparse.ArgumentParser(
        description="The rollout worker process: owns a `vllm.LLM`, serves the trainer over "
        "a local channel."
    )
    for field in dataclasses.fields(WorkerOptions):
        required = field.default is dataclasses.MISSING
        kind = {"int": int, "float": float, "str": str, "bool": _parse_bool}[field.type]
        parser.add_argument(
            f"--{field.name}",
            type=kind,
            required=required,
            default=None if required else field.default,
        )
    return WorkerOptions(**vars(parser.parse_args(argv)))


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def llm_kwargs(model_dir: str | os.PathLike, opts: WorkerOptions, *, on_cpu: bool) -> dict:
    """The keyword arguments of `vllm.LLM` for this worker (pure; tests check them)."""
    kwargs = dict(
        model=str(model_dir),
        dtype=opts.dtype,
        enforce_eager=opts.enforce_eager,
        skip_tokenizer_init=True,  # the trainer tokenizes; the worker sees token ids only
        generation_config="vllm",  # never let the folder's generation_config change sampling
        seed=opts.seed,
        max_model_len=opts.max_model_len,
        worker_extension_cls=EXTENSION_CLS,
        tensor_parallel_size=opts.tensor_parallel_size,
    )
    if on_cpu:
        # vLLM's CPU backend cannot rewind a seeded request's torch.Generator ("CPU Generator
        # does not use offset"), which chunked prefill does whenever a batch of prompts exceeds
        # the token budget (e.g. 40 eval prompts x 16 samples). Whole-prompt prefill avoids it.
        kwargs["enable_chunked_prefill"] = False
    else:  # GPU memory settings; the CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE
        kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = opts.sleep_between_rollouts
    return kwargs


def sampling_params(sampling: SamplingConfig, n: int, prompt_index: int):
    """vLLM SamplingParams for one prompt; seeds differ per prompt so equal prompts differ."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=True,  # stop only on the caller's stop ids, as the JAX sampler does
        seed=sampling.seed + prompt_index * n,  # vLLM gives sample j seed + j
        logprobs=0,  # the sampled token's raw log-prob only
        detokenize=False,
    )
