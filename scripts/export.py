"""Export a run's checkpoint as a Hugging Face folder transformers and vLLM load.

  python scripts/export.py runs/sc_sdpo_default_1a2b3c4d --out exported/sc_sdpo [--step 40]

A LoRA run also gets <out>/lora_adapter, a PEFT adapter over the run's base model.
"""

import argparse
import json

from jaxsd.export import export_run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="jaxsd run folder (holds checkpoints/<step>)")
    parser.add_argument("--out", required=True, help="folder to write the HF model to")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--dtype", default=None, help="tensor dtype (default: the run's params)")
    args = parser.parse_args(argv)
    result = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
