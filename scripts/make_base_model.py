"""Make the shipped tiny base model (assets/tiny_base): random Qwen3 -> SFT -> measure -> save.

SFT data come from the offline synthetic task's TRAIN split, in three formats:
  plain      the task's chat prompt -> the correct response;
  solution   SDPO's teacher reprompt with a correct sibling under "Correct solution:" ->
             the correct response (so the self-teacher can use a sibling, as a real LLM can);
  feedback   SDPO's reprompt with the verifier's feedback on a wrong answer -> the response.
Training stops at the first check where the student's validation pass rate (sampled at
temperature 1, on train-split records held out from SFT) reaches `--target`, so RL starts
in the sweet spot instead of at saturation. Then the held-out TEST split is measured:
mean@k of the student and of the self-teacher given a correct sibling.

Usage: .venv/bin/python scripts/make_base_model.py [--out assets/tiny_base] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from jaxsd.models import from_pretrained, save_pretrained
from jaxsd.models.sampler import generate
from jaxsd.models.tiny import ENDOFTEXT, IM_END, make_tiny_model
from jaxsd.tasks import build_reprompt, chat_token_ids, get_task
from jaxsd.train.sft import SFTConfig, encode_example, train_sft

SHAPE = dict(
    vocab_size=1024,
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=384,
)


NEAR_MISS_OFFSETS = (-4, -3, -2, -1, 1, 2, 3, 4)
NOISE_MODES = ("iid", "deck", "off_by_one")
ARITHMETIC_TASKS = ("arithmetic", "miniature")  # answers are integers in <answer></answer>


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="assets/tiny_base", help="output HF folder")
    p.add_argument("--seed", type=int, default=0, help="model init, SFT order, sampling")
    p.add_argument("--task", default="arithmetic", choices=("arithmetic", "tool_call", "miniature"))
    p.add_argument(
        "--band_correct",
        default="",
        help="miniature: per-band --correct_frac, e.g. easy=1,intermediate=0.5,hard=0.05",
    )
    p.add_argument("--digits", type=int, default=2, help="arithmetic operand digits")
    p.add_argument("--n_tools", type=int, default=2, help="tool_call tools per prompt")
    p.add_argument("--task_seed", type=int, default=0, help="the task's split seed")
    p.add_argument("--sft_size", type=int, default=4000, help="train records used by SFT")
    p.add_argument("--val_size", type=int, default=64, help="train records held out for stop")
    p.add_argument("--test_size", type=int, default=32, help="test records measured (RL eval)")
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--check_every", type=int, default=25)
    p.add_argument("--target", type=float, default=0.3, help="stop at this val pass rate")
    p.add_argument("--mix", default="0.5,0.35,0.15", help="plain,solution,feedback fractions")
    p.add_argument("--eval_n", type=int, default=8, help="k of the reported mean@k")
    p.add_argument(
        "--sft_on",
        default="train",
        choices=("train", "all"),
        help="train: SFT on train records only (val/test unseen); all: on test + train "
        "records, like pre-training that saw every problem (RL keeps them split)",
    )
    p.add_argument(
        "--correct_frac",
        type=float,
        default=1.0,
        help="fraction of student-format targets that are correct; the rest are near-miss "
        "wrong answers, so the model only knows each answer noisily (calibrated entropy)",
    )
    p.add_argument("--copies", type=int, default=1, help="examples per SFT record")
    p.add_argument("--noise", default="iid", choices=NOISE_MODES, help="see noisy_deck")
    p.add_argument(
        "--init",
        default="",
        help="start from this HF folder (an earlier stage) instead of "
        "a random tiny Qwen3; its tokenizer is kept",
    )
    p.add_argument("--max_new_tokens", type=int, default=16)
    return p.parse_args(argv)


def task_kwargs(args: argparse.Namespace, train_size: int) -> dict[str, Any]:
    extra = {
        "arithmetic": {"digits": args.digits},
        "tool_call": {"n_tools": args.n_tools},
        "miniature": {},
    }[args.task]
    return dict(seed=args.task_seed, train_size=train_size, test_size=args.test_size, **extra)


def answer_text(value: int | str) -> str:
    """The arithmetic response format the verifier reads."""
    return f"<answer>{value}</answer>"


def reference_response(task_name: str, record: dict[str, Any]) -> str:
    """The short correct response in the format the task's verifier expects."""
    if task_name in ARITHMETIC_TASKS:
        return answer_text(record["answer"])
    (call,) = json.loads(record["answer"])
    return f"Action: {call['Action']}\nAction Input: {call['Action_Input']}"


def wrong_response(
    task_name: str, record: dict[str, Any], rng: random.Random, avoid: str | None = None
) -> str:
    """A plausible wrong response (near-miss answer / wrong argument), never `avoid`."""
    if task_name in ARITHMETIC_TASKS:
        while True:
            value = int(record["answer"]) + rng.choice(NEAR_MISS_OFFSETS)
            if answer_text(value) != avoid:
                return answer_text(value)
    (call,) = json.loads(record["answer"])
    args = json.loads(call["Action_Input"])
    key = rng.choice(sorted(args))
    args[key] = 0 if isinstance(args[key], str) else "x"
    return f"Action: {call['Action']}\nAction Input: {json.dumps(args)}"


def noisy_deck(
    task_name: str, record: dict[str, Any], correct_frac: float, noise: str,
    rng: random.Random,
) -> list[str]:  # fmt: skip
    """Shuffled student-format targets whose empirical distribution is exact (modes "deck",
    "off_by_one"): the correct response `correct_frac` of the time, else each near miss
    equally often ("deck") or always the answer plus one ("off_by_one": one systematic bad
    habit). Independent draws ("iid", empty deck) leave a wrong answer the most frequent one
    for some problems when each has few copies, and the SFT model learns that wrong mode."""
    right = reference_response(task_name, record)
    if noise == "iid" or correct_frac >= 1.0 or task_name not in ARITHMETIC_TASKS:
        return []
    offsets = NEAR_MISS_OFFSETS if noise == "deck" else (1,) * len(NEAR_MISS_OFFSETS)
    wrong = [answer_text(int(record["answer"]) + d) for d in offsets for _ in range(3)]
    n_right = round(len(wrong) * correct_frac / (1.0 - correct_frac))
    deck = [right] * max(1, n_right) + wrong
    rng.shuffle(deck)
    return deck


def sft_pair(
    task, record, kind: str, rng: random.Random, correct_frac: float, deck: list[str]
) -> tuple[list[dict[str, str]], str]:
    """(messages, target): the student prompt, or SDPO's teacher reprompt with a correct
    sibling / with feedback on a wrong answer.

    With a correct sibling the target is always right (copying a shown solution is easy, so
    the self-teacher beats the student). The student prompt takes the next target of the
    record's `deck` when it has one; otherwise (and after feedback) the target is right with
    probability `correct_frac` and a near miss (never the rejected answer) else.
    """
    messages = task.messages(record)
    right = reference_response(task.name, record)
    if kind == "solution":
        return build_reprompt(messages, solution=right, feedback=None).messages, right
    if kind == "plain" and deck:
        target = deck.pop(0)
        deck.append(target)
        return messages, target
    rejected = None
    if kind == "feedback":
        rejected = wrong_response(task.name, record, rng)
        verdict = task.verify(rejected, record)
        assert verdict.reward == 0.0 and verdict.feedback, (rejected, record)
        messages = build_reprompt(messages, solution=None, feedback=verdict.feedback).messages
    if rng.random() < correct_frac:
        return messages, right
    return messages, wrong_response(task.name, record, rng, avoid=rejected)


def record_correct_frac(record: dict[str, Any], correct_frac: float | dict[str, float]) -> float:
    """The record's fraction of right student targets: one number, or one per band."""
    if not isinstance(correct_frac, dict):
        return correct_frac
    if record.get("band") not in correct_frac:
        raise ValueError(
            f"--band_correct has no fraction for band {record.get('band')!r} of record "
            f"{record['id']}; name every band (e.g. easy=1,intermediate=0.5,hard=0.05)"
        )
    return correct_frac[record["band"]]


def parse_band_correct(spec: str) -> dict[str, float]:
    """Parse "easy=1,hard=0.05" into {"easy": 1.0, "hard": 0.05}, each in (0, 1]."""
    out = {}
    for entry in spec.split(","):
        name, _, value = entry.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--band_correct entry {entry!r} must be band=fraction") from None
        if not 0.0 < out[name.strip()] <= 1.0:
            raise ValueError(f"--band_correct {entry!r}: the fraction must be in (0, 1]")
    return out


def build_examples(
    task, records, tokenizer, mix: list[float], seed: int,
    correct_frac: float | dict[str, float] = 1.0,
    copies: int = 1, noise: str = "iid",
) -> list:  # fmt: skip
    """`copies` examples per record, each with its format drawn with probabilities `mix`;
    student-format targets noisy per `noise` (NOISE_MODES)."""
    if noise not in NOISE_MODES:
        raise ValueError(f"noise={noise!r}; use one of {NOISE_MODES}")
    rng = random.Random(seed)
    fracs = [record_correct_frac(r, correct_frac) for r in records]
    decks = [noisy_deck(task.name, r, f, noise, rng) for r, f in zip(records, fracs, strict=True)]
    examples = []
    for _ in range(copies):
        kinds = rng.choices(("plain", "solution", "feedback"), weights=mix, k=len(records))
        for record, kind, deck, frac in zip(records, kinds, decks, fracs, strict=True):
            messages, target = sft_pair(task, record, kind, rng, frac, deck)
            examples.append(encode_example(tokenizer, messages, target, max_len=256))
    return examples


def correctness(model, tokenizer, task, records, prompts, *, n, temperature, top_p, seed, m):
    """[P, n] 0/1 rewards of n sampled responses per prompt (embedded JAX sampler)."""
    stop_ids = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    rows = []
    for start in range(0, len(prompts), 32):
        ids = [chat_token_ids(tokenizer, p) for p in prompts[start : start + 32]]
        out = generate(
            model,
            ids,
            n=n,
            max_new_tokens=m,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=stop_ids,
            seed=seed + start,
        )
        texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
        for i, k in zip(out.prompt_index, range(len(texts)), strict=True):
            rows.append(task.verify(texts[k], records[start + i]).reward)
    return np.asarray(rows, np.float64).reshape(len(prompts), n)


def measure(model, tokenizer, task, records, *, n, seed, m) -> dict[str, float]:
    """Student and self-teacher(correct sibling) mean@n at T=1.0 and T=0.6/top-p 0.95."""
    student = [task.messages(r) for r in records]
    teacher = [
        build_reprompt(
            task.messages(r), solution=reference_response(task.name, r), feedback=None
        ).messages
        for r in records
    ]
    out = {}
    for tag, temperature, top_p in (("t1", 1.0, 1.0), ("t06", 0.6, 0.95)):
        for who, prompts in (("student", student), ("teacher", teacher)):
            c = correctness(
                model, tokenizer, task, records, prompts,
                n=n, temperature=temperature, top_p=top_p, seed=seed, m=m,
            )  # fmt: skip
            out[f"{who}_mean@{n}_{tag}"] = round(float(c.mean()), 4)
            for band in sorted({r["band"] for r in records if "band" in r}):
                rows = [i for i, r in enumerate(records) if r.get("band") == band]
                out[f"{who}_mean@{n}_{tag}_band={band}"] = round(float(c[rows].mean()), 4)
            if who == "student":
                out[f"student_frac_mixed_{tag}"] = round(float(np.mean(np.ptp(c, axis=1) > 0)), 4)
    greedy = correctness(
        model, tokenizer, task, records, student, n=1, temperature=0.0, top_p=1.0, seed=seed, m=m
    )
    out["student_greedy"] = round(float(greedy.mean()), 4)
    return out


def readme(
    argv: list[str], result: dict[str, Any], history: list[dict[str, Any]], name: str = "tiny_base"
) -> str:
    """assets/tiny_base/README.md: how the folder was made and what it measured."""
    cmd = " ".join([".venv/bin/python scripts/make_base_model.py", *argv])
    n = result["eval_n"]
    stop = (
        f"the first check where the student's sampled (T=1) pass rate on held-out train "
        f"records reached the target {result['target']}"
        if result["reached_target"]
        else "the step cap (no pass-rate target: no validation split)"
        if result["target"] > 1.0
        else f"the step cap, WITHOUT reaching the target pass rate {result['target']}"
    )
    bands = sorted({k.split("band=")[1] for k in result if "_band=" in k})
    rows = "\n".join(
        f"| {who}{label} | {result[f'{who}_mean@{n}_t1{tag}']:.3f} "
        f"| {result[f'{who}_mean@{n}_t06{tag}']:.3f} |"
        for who in ("student", "teacher")
        for label, tag in [("", ""), *((f", band {b}", f"_band={b}") for b in bands)]
    )
    curve = "\n".join(
        f"| {h['step']} | {h['nll']:.3f} | "
        f"{'–' if h['val_mean@4_t1'] is None else format(h['val_mean@4_t1'], '.3f')} |"
        for h in history
    )
    origin = (
        f"continued from `{result['init']}` (an earlier stage)"
        if result.get("init")
        else f"random init from `jaxsd.models.tiny.make_tiny_model` (seed {result['seed']})"
    )
    records = (
        "test and train splits (pre-training-like: every problem seen; RL keeps them apart)"
        if result.get("sft_on") == "all"
        else "train split"
    )
    noise = (
        f"Student-format targets are right a per-band fraction of the time "
        f"(`{result['band_correct']}`), noise mode `{result['noise']}` otherwise "
        f"(`noisy_deck` in the script)."
        if result.get("band_correct")
        else f"Student-format targets are right {result['correct_frac']:.0%} of the time, "
        f"noise mode `{result['noise']}` otherwise (`noisy_deck` in the script)."
        if result.get("correct_frac", 1.0) < 1.0
        else "All targets are right."
    )
    return f"""# {name}: a shipped tiny Qwen3 base model

A {result["num_params"]:,}-parameter Qwen3 (`{json.dumps(SHAPE)}`), {origin}, then SFT
with `jaxsd.train.sft` on the `{result["task"]}` task's {records}
(`{json.dumps(result["task_kwargs"])}`) in three formats: the student prompt, SDPO's
teacher reprompt with a correct sibling under "Correct solution:", and SDPO's reprompt with
the verifier's feedback on a wrong answer (mix {result["mix"]}). {noise} Training ran
{result["sft_steps"]} steps: {stop}. Deterministic given the seed.

Reproduce (wrote this folder in {result["wall_s"]:.0f} s on a shared 2-core CPU):

    {cmd}

Held-out test split ({result["test_size"]} questions), mean@{n}; the teacher is the same model
reading SDPO's reprompt with a correct sibling solution:

| policy | mean@{n} T=1.0 | mean@{n} T=0.6, top-p 0.95 |
|---|---|---|
{rows}

Student greedy accuracy: {result["student_greedy"]:.3f}; fraction of test questions whose
{n} samples (T=1) are neither all right nor all wrong: {result["student_frac_mixed_t1"]:.3f}.

SFT curve (mean response NLL over the last check window; val pass rate at T=1, n=4):

| step | NLL | val mean@4 |
|---|---|---|
{curve}
"""


def main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.time()
    mix = [float(x) for x in args.mix.split(",")]
    train_size = args.sft_size + args.val_size
    task = get_task(args.task, **task_kwargs(args, train_size))
    train = task.load("train")
    sft_records, val_records = train[: args.sft_size], train[args.sft_size :]
    test_records = task.load("test")
    if args.sft_on == "all":
        sft_records = test_records + sft_records

    work = pathlib.Path(tempfile.mkdtemp(prefix="tiny_base_"))
    if args.init:
        shutil.rmtree(work)
        shutil.copytree(args.init, work)
    else:
        make_tiny_model(work, seed=args.seed, **SHAPE)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work)
    model, config = from_pretrained(work)
    if not 0.0 < args.correct_frac <= 1.0:
        raise ValueError(f"--correct_frac={args.correct_frac} must be in (0, 1]")
    correct = parse_band_correct(args.band_correct) if args.band_correct else args.correct_frac
    examples = build_examples(
        task, sft_records, tokenizer, mix, args.seed, correct, args.copies, args.noise
    )
    cfg = SFTConfig(
        steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(20, args.max_steps // 10),
        seed=args.seed,
    )
    val_student = [task.messages(r) for r in val_records]
    history = []

    def check(step: int, model, nll: float) -> bool:
        val = None
        if val_records:
            c = correctness(
                model, tokenizer, task, val_records, val_student,
                n=4, temperature=1.0, top_p=1.0, seed=args.seed, m=args.max_new_tokens,
            )  # fmt: skip
            val = float(c.mean())
        history.append({"step": step, "nll": round(nll, 4), "val_mean@4_t1": val})
        print(json.dumps({**history[-1], "elapsed_s": round(time.time() - t0, 1)}), flush=True)
        return val is not None and val >= args.target

    model, losses = train_sft(
        model,
        examples,
        cfg,
        pad_id=tokenizer.pad_token_id,
        callback=check,
        callback_every=args.check_every,
    )
    metrics = measure(
        model, tokenizer, task, test_records, n=args.eval_n, seed=args.seed, m=args.max_new_tokens
    )
    result = {
        "task": args.task,
        "task_kwargs": task_kwargs(args, args.sft_size),
        "seed": args.seed,
        "sft_steps": len(losses),
        "final_nll": round(float(np.mean(losses[-args.check_every :])), 4),
        "num_params": config.num_params(),
        "mix": args.mix,
        "reached_target": bool(history)
        and history[-1]["val_mean@4_t1"] is not None
        and history[-1]["val_mean@4_t1"] >= args.target,
        "init": args.init,
        "sft_on": args.sft_on,
        "correct_frac": args.correct_frac,
        "band_correct": args.band_correct,
        "noise": args.noise,
        "target": args.target,
        "test_size": args.test_size,
        "eval_n": args.eval_n,
        **metrics,
        "wall_s": round(time.time() - t0, 1),
        "jax_backend": jax.default_backend(),
    }
    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    save_pretrained(model, config, out, tokenizer_dir=work)
    (out / "make_base_model.json").write_text(
        json.dumps({"args": vars(args), "result": result, "history": history}, indent=1)
    )
    (out / "README.md").write_text(readme(argv, result, history, out.name))
    shutil.rmtree(work)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
