"""Evaluate a model on a task split with the embedded JAX sampler (METHODS §9).

  python scripts/eval.py --model /path/to/hf_folder --task arithmetic --n 16 --limit 50 \
      --out eval.json
  python scripts/eval.py --model runs/sc_sdpo_default_1a2b3c4d [--step 40] --task arithmetic \
      --task_kwargs '{"digits": 1, "test_size": 40}'

`--model` takes an HF folder or a run folder (its latest checkpoint, or `--step`).
"""

import argparse
import json

from jaxsd.eval import (
    EVAL_MIN_P,
    EVAL_N,
    EVAL_TEMPERATURE,
    EVAL_TOP_K,
    EVAL_TOP_P,
    evaluate_model,
)

THINKING = {"true": True, "false": False, "default": None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face folder or jaxsd run folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint of a run folder")
    parser.add_argument(
        "--task", required=True, help="registered task name (jaxsd.tasks) or file:/path/data.jsonl"
    )
    parser.add_argument(
        "--task_kwargs", type=json.loads, default=None,
        help='the task\'s settings as JSON, e.g. \'{"digits": 2}\'',
    )  # fmt: skip
    parser.add_argument("--task_module", default="", help="module registering your tasks")
    parser.add_argument("--reward", default="", help="module:function scoring a file: task")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=EVAL_N, help="samples per question")
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument("--out", default=None, help="JSON file for the report and per-record rows")
    parser.add_argument("--temperature", type=float, default=EVAL_TEMPERATURE)
    parser.add_argument("--top_p", type=float, default=EVAL_TOP_P)
    parser.add_argument("--top_k", type=int, default=EVAL_TOP_K, help="0 = off")
    parser.add_argument("--min_p", type=float, default=EVAL_MIN_P, help="0 = off")
    parser.add_argument(
        "--enable_thinking",
        choices=sorted(THINKING),
        default="default",
        help="chat template switch (Qwen3: false = no thinking; default = the template's own)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=2048)
    parser.add_argument("--max_prompt_tokens", type=int, default=2048)
    parser.add_argument("--prompts_per_batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="dataset root (default shared/data)")
    parser.add_argument("--keep_responses", action="store_true", help="store texts in --out")
    args = parser.parse_args(argv)
    kwargs = vars(args)
    kwargs["enable_thinking"] = THINKING[kwargs["enable_thinking"]]
    result = evaluate_model(**kwargs)
    print(json.dumps(result["report"], indent=2))
    return result


if __name__ == "__main__":
    main()
