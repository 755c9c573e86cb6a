"""Append one measurement to the ledger `bench/results.jsonl`.

    .venv/bin/python bench/rollout.py --shape small | .venv/bin/python bench/record.py \
        --machine "2-core CPU VM" --command "bench/rollout.py --shape small"

Reads the benchmark's JSON (one object, or one object per line) from stdin and appends one
ledger line per object: {"date", "machine", "command", "source", "figures"}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

LEDGER = pathlib.Path(__file__).resolve().parent / "results.jsonl"


def parse_figures(text: str) -> list[dict]:
    """One JSON object, or JSON lines; anything else is an error naming the offending line."""
    text = text.strip()
    if not text:
        raise ValueError("no benchmark output on stdin (pipe a bench script's JSON into this)")
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        pass
    figures = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            figures.append(json.loads(line))
        except json.JSONDecodeError as err:
            snippet = line[:80]
            raise ValueError(f"stdin line {number} is not JSON ({err.msg}): {snippet!r}") from None
    return figures


def ledger_lines(figures: list[dict], *, machine: str, command: str, date: str) -> list[str]:
    common = {"date": date, "machine": machine, "command": command, "source": "bench/record.py"}
    return [
        json.dumps({**common, "figures": fig}, separators=(",", ":"), ensure_ascii=False)
        for fig in figures
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", required=True, help='e.g. "2-core CPU VM" or "one H100"')
    parser.add_argument("--command", required=True, help="the command that printed the figures")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--ledger", type=pathlib.Path, default=LEDGER)
    args = parser.parse_args(argv)
    try:
        figures = parse_figures(sys.stdin.read())
    except ValueError as err:
        print(f"bench/record.py: {err}; nothing appended", file=sys.stderr)
        return 2
    lines = ledger_lines(figures, machine=args.machine, command=args.command, date=args.date)
    with args.ledger.open("a") as ledger:
        ledger.write("".join(line + "\n" for line in lines))
    print(f"appended {len(lines)} measurement(s) to {args.ledger}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
