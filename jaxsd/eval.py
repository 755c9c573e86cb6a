"""Evaluation: mean@k, maj@k, best@k per task and averaged over tasks (METHODS §9).

The metrics are pure functions of per-sample correctness `[P, K]` (P prompts, K samples) and
extracted answers; `evaluate` drives any engine through a `generate_fn` callable, so the
embedded JAX sampler and vLLM are evaluated by the same code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jaxsd.tasks.base import verify_all
from jaxsd.tasks.reprompt import SUCCESS_THRESHOLD

# METHODS §9 sampling: n = 16 samples per question at temperature 0.6, top-p 0.95 (no top-k,
# no min-p; SSOPD's preset adds Qwen3's thinking-mode top-k 20).
EVAL_N = 16
EVAL_TEMPERATURE = 0.6
EVAL_TOP_P = 0.95
EVAL_TOP_K = 0
EVAL_MIN_P = 0.0

Messages = list[dict[str, str]]


class GenerateFn(Protocol):
    """`generate_fn(prompts, n=, temperature=, top_p=, top_k=, min_p=, seed=) -> [P][n] texts`."""

    def __call__(
        self,
        prompts: Sequence[Messages],
        *,
        n: int,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        seed: int,
    ) -> Sequence[Sequence[str]]: ...


def _as_correct(correct_PxK: Any) -> np.ndarray:
    arr = np.asarray(correct_PxK)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"correctness must be a non-empty [P, K] array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError("correctness must be boolean or 0/1; threshold rewards first")
        arr = arr.astype(bool)
    return arr


def mean_at_k(correct_PxK: Any) -> float:
    """mean@k: mean correctness over all P x K samples (METHODS §9)."""
    return float(np.mean(_as_correct(correct_PxK)))


def best_at_k(correct_PxK: Any) -> float:
    """best@k: fraction of prompts with at least one correct sample (METHODS §9)."""
    return float(np.mean(np.any(_as_correct(correct_PxK), axis=1)))


def majority_index(answers: Sequence[str | None]) -> int:
    """Index of the sample whose answer wins the vote (METHODS §9).

    The most frequent non-None answer wins; ties go to the answer seen first in sample order;
    None wins only when every answer is None (then index 0).
    """
    if len(answers) == 0:
        raise ValueError("majority vote over zero answers")
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        counts[ans] = counts.get(ans, 0) + 1
        first.setdefault(ans, i)
    if not counts:
        return 0
    # dicts keep insertion (= first-seen) order and max() keeps the first maximum: ties -> first.
    winner = max(counts, key=counts.__getitem__)
    return first[winner]


def maj_at_k(extracted_PxK: Sequence[Sequence[str | None]], correct_PxK: Any) -> float:
    """maj@k: correctness of the majority-voted extracted answer, averaged over prompts (§9)."""
    correct = _as_correct(correct_PxK)
    if len(extracted_PxK) != correct.shape[0]:
        raise ValueError(f"{len(extracted_PxK)} answer lists for {correct.shape[0]} prompts")
    votes = []
    for p, answers in enumerate(extracted_PxK):
        if len(answers) != correct.shape[1]:
            raise ValueError(f"prompt {p}: {len(answers)} answers for {correct.shape[1]} samples")
        votes.append(correct[p, majority_index(answers)])
    return float(np.mean(votes))


def task_report(
    rewards_PxK: Any,
    extracted_PxK: Sequence[Sequence[str | None]],
    *,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> dict[str, float | int]:
    """mean@k, maj@k, best@k of one task; a sample is correct when reward >= the threshold."""
    rewards = np.asarray(rewards_PxK, dtype=np.float64)
    if rewards.ndim != 2 or not np.all(np.isfinite(rewards)):
        raise ValueError(f"rewards must be a finite [P, K] array, got shape {rewards.shape}")
    correct = rewards >= success_threshold
    k = correct.shape[1]
    return {
        f"mean@{k}": mean_at_k(correct),
        f"maj@{k}": maj_at_k(extracted_PxK, correct),
        f"best@{k}": best_at_k(correct),
        "mean_reward": float(rewards.mean()),
        "num_prompts": int(correct.shape[0]),
        "k": k,
    }


_AVERAGED = ("mean@", "maj@", "best@", "mean_reward")


def band_reports(
    rewards_PxK: Any,
    extracted_PxK: Sequence[Sequence[str | None]],
    bands: Sequence[str | None],
    *,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> dict[str, float]:
    """`<metric>/band=<band>` for each band of the records (the miniature task tags every
    record with one): each metric of `task_report` on that band's prompts alone. Records
    without a band are only in the whole-task metrics; no band at all gives {}."""
    rewards = np.asarray(rewards_PxK, dtype=np.float64)
    if len(bands) != rewards.shape[0]:
        raise ValueError(f"{len(bands)} bands for {rewards.shape[0]} prompts")
    out: dict[str, float] = {}
    for band in sorted({b for b in bands if b is not None}):
        rows = [p for p, b in enumerate(bands) if b == band]
        rep = task_report(
            rewards[rows], [extracted_PxK[p] for p in rows], success_threshold=success_threshold
        )
        out.update({f"{k}/band={band}": v for k, v in rep.items() if k.startswith(_AVERAGED)})
    return out


def average_reports(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task reports plus their unweighted average over tasks (METHODS §9, §10)."""
    if not reports:
        raise ValueError("no task reports to average")
    ks = {r["k"] for r in reports.values()}
    if len(ks) != 1:
        raise ValueError(f"tasks were evaluated with different k {sorted(ks)}; use one n")
    # Per-band keys exist only for tasks with bands: each key averages the tasks that have it.
    keys = dict.fromkeys(k for r in reports.values() for k in r if k.startswith(_AVERAGED))
    average = {key: float(np.mean([r[key] for r in reports.values() if key in r])) for key in keys}
    return {"tasks": {name: dict(r) for name, r in reports.items()}, "average": average}


def evaluate(
    generate_fn: GenerateFn,
    task: Any,
    records: Sequence[dict[str, Any]],
    *,
    n: int = EVAL_N,
    temperature: float = EVAL_TEMPERATURE,
    top_p: float = EVAL_TOP_P,
    top_k: int = EVAL_TOP_K,
    min_p: float = EVAL_MIN_P,
    seed: int = 0,
    success_threshold: float = SUCCESS_THRESHOLD,
    keep_responses: bool = False,
) -> dict[str, Any]:
    """Sample n responses per record, verify them, and report mean@n / maj@n / best@n (§9)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if not records:
        raise ValueError(f"no records to evaluate for task {getattr(task, 'name', task)!r}")
    prompts = [task.messages(r) for r in records]
    start = time.perf_counter()
    responses = generate_fn(
        prompts, n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed
    )
    gen_seconds = time.perf_counter() - start
    if len(responses) != len(records):
        raise ValueError(f"generate_fn returned {len(responses)} groups for {len(records)} prompts")
    rewards = np.zeros((len(records), n))
    extracted: list[list[str | None]] = []
    per_record = []
    for p, (record, group) in enumerate(zip(records, responses, strict=True)):
        if len(group) != n:
            raise ValueError(f"generate_fn returned {len(group)} responses for prompt {p}, not {n}")
        verdicts = verify_all(task, list(group), [record] * len(group))
        rewards[p] = [v.reward for v in verdicts]
        extracted.append([v.extracted for v in verdicts])
        row = {"id": record.get("id", p), "rewards": rewards[p].tolist(), "extracted": extracted[p]}
        if keep_responses:
            row["responses"] = list(group)
        per_record.append(row)
    report = task_report(rewards, extracted, success_threshold=success_threshold)
    bands = [r.get("band") for r in records]
    report.update(band_reports(rewards, extracted, bands, success_threshold=success_threshold))
    report.update(
        task=getattr(task, "name", type(task).__name__),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        generate_seconds=gen_seconds,
    )
    return {"report": report, "per_record": per_record}


def eval_metrics_for_log(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Flat `eval/<task>/<metric>` and `eval/<metric>` (averaged) scalars for MetricsWriter."""
    combined = average_reports(reports)
    flat: dict[str, float] = {}
    for name, rep in combined["tasks"].items():
        flat.update({f"eval/{name}/{k}": v for k, v in rep.items() if k.startswith(_AVERAGED)})
    flat.update({f"eval/{k}": v for k, v in combined["average"].items()})
    return flat


def stop_token_ids(model_dir: str | os.PathLike, tokenizer: Any) -> list[int]:
    """End-of-turn ids: generation_config.json's eos_token_id(s) plus the tokenizer's eos."""
    ids = set()
    path = os.path.join(os.fspath(model_dir), "generation_config.json")
    if os.path.isfile(path):
        with open(path) as fh:
            eos = json.load(fh).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(f"no eos_token_id in {path} or the tokenizer; cannot stop generation")
    return sorted(ids)


def embedded_generate_fn(
    model: Any,
    tokenizer: Any,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    max_prompt_tokens: int = 2048,
    prompts_per_batch: int = 8,
    enable_thinking: bool | None = None,
) -> GenerateFn:
    """A `generate_fn` over the embedded JAX sampler (jaxsd.models.sampler.generate).

    `enable_thinking` goes to the chat template (None: the template's default).
    """
    from jaxsd.models import sampler
    from jaxsd.tasks.reprompt import chat_token_ids

    if prompts_per_batch < 1:
        raise ValueError(f"prompts_per_batch={prompts_per_batch} must be >= 1")

    def generate_fn(
        prompts: Sequence[Messages],
        *,
        n: int,
        temperature: float,
        top_p: float,
        top_k: int = EVAL_TOP_K,
        min_p: float = EVAL_MIN_P,
        seed: int,
    ) -> list[list[str]]:
        groups: list[list[str]] = []
        for start in range(0, len(prompts), prompts_per_batch):
            chunk = prompts[start : start + prompts_per_batch]
            ids = [
                chat_token_ids(tokenizer, m, max_prompt_tokens, enable_thinking=enable_thinking)
                for m in chunk
            ]
            out = sampler.generate(
                model,
                ids,
                n=n,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                stop_token_ids=stop_ids,
                # Distinct streams per chunk; the same (seed, prompts) always gives the same text.
                seed=seed * 1_000_003 + start,
            )
            texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
            groups.extend(texts[i * n : (i + 1) * n] for i in range(len(chunk)))
        return groups

    return generate_fn


def _fitting(task: Any, tokenizer: Any, records: list, max_len: int, split: str):
    from jaxsd.tasks.reprompt import chat_token_ids
    from jaxsd.train.data import drop_overlong

    lengths = [len(chat_token_ids(tokenizer, task.messages(r), sys.maxsize)) for r in records]
    return drop_overlong(records, lengths, max_len=max_len, mode="filter", what=split)


def evaluate_model(
    *,
    model: str | os.PathLike,
    task: str,
    split: str = "test",
    n: int = EVAL_N,
    limit: int | None = None,
    out: str | os.PathLike | None = None,
    temperature: float = EVAL_TEMPERATURE,
    top_p: float = EVAL_TOP_P,
    top_k: int = EVAL_TOP_K,
    min_p: float = EVAL_MIN_P,
    max_new_tokens: int = 2048,
    max_prompt_tokens: int = 2048,
    prompts_per_batch: int = 8,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    keep_responses: bool = False,
    task_kwargs: dict[str, Any] | None = None,
    step: int | None = None,
    task_module: str = "",
    reward: str = "",
    enable_thinking: bool | None = None,
) -> dict[str, Any]:
    """Load a model and a task split, `evaluate` with the embedded sampler, write `out`.

    `model` is an HF folder or a jaxsd run folder (its checkpoint `step`, default the latest);
    `task_kwargs` are the task's settings (e.g. {"digits": 2}); `task_module` / `reward` are
    the config's task.module / task.reward (custom tasks); `enable_thinking` goes to the chat
    template (Qwen3: False = no thinking; None = a run folder's own setting, else the
    template's default).
    """
    from transformers import AutoTokenizer

    from jaxsd.tasks.custom import task_from_config

    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for the whole split)")
    the_task = task_from_config(
        {"name": task, "module": task_module, "reward": reward, "kwargs": task_kwargs or {}}
    )
    records = the_task.load(split, data_dir)[:limit]
    net, tokenizer_dir, model_name, enable_thinking = _load_model(model, step, enable_thinking)
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    # A prompt over max_prompt_tokens is dropped and counted, never cut (as in training).
    records, data_stats = _fitting(the_task, tokenizer, records, max_prompt_tokens, split)
    generate_fn = embedded_generate_fn(
        net,
        tokenizer,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_token_ids(tokenizer_dir, tokenizer),
        max_prompt_tokens=max_prompt_tokens,
        prompts_per_batch=prompts_per_batch,
        enable_thinking=enable_thinking,
    )
    result = evaluate(
        generate_fn,
        the_task,
        records,
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        keep_responses=keep_responses,
    )
    result["report"].update(
        model=model_name,
        split=split,
        task_kwargs=task_kwargs or {},
        enable_thinking=enable_thinking,
        **data_stats,
    )
    if out is not None:
        _write_json(out, result)
    return result


def _load_model(
    model: str | os.PathLike, step: int | None, enable_thinking: bool | None
) -> tuple[Any, str | os.PathLike, str, bool | None]:
    """(network, tokenizer folder, name for the report, chat-template thinking switch) of an
    HF folder or a jaxsd run folder (its checkpoint `step`, default the latest)."""
    from jaxsd.export import is_run_dir, load_run_model
    from jaxsd.models import from_pretrained

    if is_run_dir(model):
        loaded = load_run_model(model, step)
        if enable_thinking is None:  # the run's own chat-template switch
            enable_thinking = loaded["cfg"].model.get("enable_thinking")
        name = f"{os.fspath(model)}@step{loaded['step']}"
        return loaded["model"], loaded["model_dir"], name, enable_thinking
    if step is not None:
        raise ValueError(f"step={step} needs a run folder; {model} is an HF folder")
    net, _ = from_pretrained(model)
    return net, model, os.fspath(model), enable_thinking


def _write_json(out: str | os.PathLike, result: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out))), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
