"""Write a tiny random-init Qwen3 HF folder with a trained tokenizer (jaxsd.models.tiny).

python scripts/make_tiny_model.py --out /tmp/tiny_qwen3 --seed 0 --hidden_size 64
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxsd.models.tiny import make_tiny_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the weight init")
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--num_kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=16)
    p.add_argument("--intermediate_size", type=int, default=128)
    p.add_argument("--tie_word_embeddings", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pathlib.Path:
    args = vars(parse_args(argv))
    out = make_tiny_model(args.pop("out"), **args)
    print(out)
    return out


if __name__ == "__main__":
    main()
