"""Would prefix sharing pay in the train step? Token counts of real batches. Prints one JSON object.

    .venv/bin/python bench/teacher_prefix.py --config configs/sc_sdpo.py:default,rollout.n=8

Samples `--steps` batches with the config's model (no training), plans them with the config's
method and tokenises them as the learner does. Within a question's group, rows that start with
the same tokens could run that prefix once: the student rows share the prompt, teacher rows
that got the same demonstration share the whole reprompt. Per side it reports the tokens a
forward runs today (the sum of the rows' lengths, before padding) and with every shared
prefix run once (the nodes of the group's prefix tree), and the share of the train step's
FLOPs the teacher's sharing could save: 2·N per teacher token (forward only) against
6·N per student token (forward and backward), attention and the LM head left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from collections.abc import Sequence


def prefix_tree_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens a forward runs when every shared prefix runs once: the nodes of the sequences'
    prefix tree (sorted, each adds its length past the longest prefix shared with its
    predecessor)."""
    ordered = sorted(tuple(s) for s in sequences)
    nodes, previous = 0, ()
    for seq in ordered:
        shared = 0
        for a, b in zip(previous, seq, strict=False):
            if a != b:
                break
            shared += 1
        nodes += len(seq) - shared
        previous = seq
    return nodes


def side_counts(groups: Sequence[Sequence[Sequence[int]]]) -> dict[str, float]:
    """Today's tokens, with sharing, and the fraction saved, summed over groups of rows."""
    today = sum(len(s) for g in groups for s in g)
    shared = sum(prefix_tree_tokens(g) for g in groups)
    return {"tokens": today, "tokens_shared": shared, "saved_frac": 1 - shared / max(today, 1)}


def step_share(teacher: dict, student: dict) -> float:
    """Share of the step's 2N·T_teacher + 6N·T_student FLOPs that the teacher's sharing saves."""
    saved = teacher["tokens"] - teacher["tokens_shared"]
    return 2 * saved / max(2 * teacher["tokens"] + 6 * student["tokens"], 1)


def batch_rows(samples, group_ids) -> tuple[list, list]:
    """Per group: the student rows (prompt + response) and the teacher rows (reprompt, or the
    prompt where the method gives none, + response)."""
    student, teacher = {}, {}
    for sample, gid in zip(samples, group_ids, strict=True):
        reprompt = sample.teacher_prompt_ids or sample.prompt_ids
        student.setdefault(gid, []).append(list(sample.prompt_ids) + list(sample.response_ids))
        teacher.setdefault(gid, []).append(list(reprompt) + list(sample.response_ids))
    return list(student.values()), list(teacher.values())


def measure(cfg, steps: int) -> dict:
    from jaxsd import algorithms
    from jaxsd.train.build import build
    from jaxsd.train.learner import plans_to_samples

    run = build(cfg)
    try:
        student, teacher = [], []
        for step in range(steps):  # the same (untrained) weights, served as each step's
            run.worker.update_weights(run.learner.state, step)
            records, epoch = run.data.for_step(step, run.settings)
            groups, _ = run.worker.collect(records, step)
            plans, run.host_state, _ = run.algorithm.plan(groups, run.host_state, epoch=epoch)
            samples = plans_to_samples(run.learner.prompts, groups, plans)
            ids = [r.question_id for r in algorithms.flat_rollouts(groups)]
            s, t = batch_rows(samples, [f"{step}/{q}" for q in ids])
            student += s
            teacher += t
    finally:
        run.close()
    out = {"student": side_counts(student), "teacher": side_counts(teacher)}
    out["step_flops_saved_by_teacher_sharing"] = step_share(out["teacher"], out["student"])
    out["groups"] = len(teacher)
    return out


def load_config(spec: str):
    """A config from "file[:preset,key=value,...]", as `scripts/train.py --config=` reads it."""
    from configs import resolve_path

    path, _, arg = resolve_path(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sc_sdpo.py", help="file[:preset,k=v,...]")
    parser.add_argument("--steps", type=int, default=3, help="batches to sample")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="jaxsd-prefix-") as tmp:
        cfg.run_dir = f"{tmp}/run"
        figures = measure(cfg, args.steps)
    print(json.dumps({"bench": "teacher_prefix", "config": args.config, "steps": args.steps,
                      **figures}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
