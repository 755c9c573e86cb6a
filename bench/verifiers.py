"""Verifier throughput: real-length responses and 1 MB adversarial inputs; prints one JSON object.

Usage: .venv/bin/python bench/verifiers.py [--repeats N]
"""

import argparse
import functools
import json
import time

from jaxsd.tasks import get_task
from jaxsd.tasks.math import normalize_answer
from jaxsd.tasks.tool_use import parse_golden

MB = 1 << 20


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _verify_all(task, pairs) -> None:
    # Cold caches: the gold-answer caches would otherwise turn repeats into lookups.
    normalize_answer.cache_clear()
    parse_golden.cache_clear()
    for response, record in pairs:
        task.verify(response, record)


def _real_cases() -> dict[str, tuple]:
    """(task, records, responses) with ground-truth responses padded to ~2 KB of reasoning."""
    pad = "Let me think step by step about this problem. " * 40
    cases = {}
    sci = get_task("sciknoweval")
    recs = sci.load("test")
    cases["sciknoweval"] = (sci, recs, [f"{pad}<answer>\n{r['answer']}\n</answer>" for r in recs])
    tool = get_task("tooluse")
    recs = tool.load("test")
    resp = [
        pad
        + "".join(
            f"Action: {s['Action']}\nAction Input: {s['Action_Input']}\n"
            for s in json.loads(r["answer"])
        )
        for r in recs
    ]
    cases["tooluse"] = (tool, recs, resp)
    for name in ("gsm8k", "math500"):
        task = get_task(name)
        recs = task.load("test")
        cases[name] = (task, recs, [f"{pad}\\boxed{{{r['answer']}}}" for r in recs])
    return cases


ADVERSARIAL = {
    "unclosed_action_inputs": "Action Input: {" * (MB // 15),
    "unclosed_boxes": "\\boxed{" * (MB // 7),
    "unclosed_think_and_answers": "<answer><think>" * (MB // 15),
    "deep_json": "Action Input: " + "[" * MB + "}",
    "deep_json_object": "Action Input: " + '{"a":' * (MB // 5) + "}",
    "hash_spaces": "####" + " " * MB + "x",
    "digits_in_box": "\\boxed{" + "9" * MB + "}",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out: dict = {"real": {}, "adversarial_1mb_seconds": {}}
    for name, (task, recs, resp) in _real_cases().items():
        pairs = list(zip(resp, recs, strict=True))
        rewards = [task.verify(x, r).reward for x, r in pairs]
        sec = _time(functools.partial(_verify_all, task, pairs), args.repeats)
        out["real"][name] = {
            "responses": len(recs),
            "responses_per_s": round(len(recs) / sec, 1),
            "ground_truth_reward_mean": round(sum(rewards) / len(rewards), 4),
        }
    records = {
        "sciknoweval": {"answer": "C"},
        "tooluse": {"answer": json.dumps([{"Action": "a", "Action_Input": "{}"}])},
        "gsm8k": {"answer": "18"},
        "math500": {"answer": "\\frac{1}{2}"},
    }
    tasks = {name: get_task(name) for name in records}
    for kind, text in ADVERSARIAL.items():
        out["adversarial_1mb_seconds"][kind] = {
            name: round(_time(functools.partial(tasks[name].verify, text, rec), args.repeats), 4)
            for name, rec in records.items()
        }
    worst = max(v for d in out["adversarial_1mb_seconds"].values() for v in d.values())
    out["adversarial_worst_seconds"] = worst
    print(json.dumps(out))


if __name__ == "__main__":
    main()
