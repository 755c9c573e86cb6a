"""bench/record.py and the ledger bench/results.jsonl it appends to (tests of a bench script,
not of jaxsd)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIELDS = {"date", "machine", "command", "source", "figures"}


def _record(stdin: str, ledger: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench/record.py"), "--machine", "test box",
         "--command", "bench/x.py --n 1", "--ledger", str(ledger), *extra],
        input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_record_appends_one_line_per_object(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text('{"old": 1}\n')
    one = _record('{\n "bench": "a",\n "tokens_per_s": 12.5\n}\n', ledger, "--date", "2026-01-02")
    assert one.returncode == 0, one.stderr
    lines = _record('{"row": 1}\n\n{"row": 2}\n', ledger).returncode
    assert lines == 0
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert records[0] == {"old": 1}  # appended, never rewritten
    assert records[1] == {"date": "2026-01-02", "machine": "test box",
                          "command": "bench/x.py --n 1", "source": "bench/record.py",
                          "figures": {"bench": "a", "tokens_per_s": 12.5}}  # fmt: skip
    assert [r["figures"] for r in records[2:]] == [{"row": 1}, {"row": 2}]


@pytest.mark.parametrize("stdin, message", [("", "no benchmark output"),
                                            ('{"a": 1}\nnot json\n', "stdin line 2 is not JSON")])
def test_record_rejects_bad_input_and_writes_nothing(tmp_path, stdin, message):
    ledger = tmp_path / "ledger.jsonl"
    result = _record(stdin, ledger)
    assert result.returncode != 0 and message in result.stderr
    assert not ledger.exists()


def test_repo_ledger_lines_are_complete():
    lines = (ROOT / "bench/results.jsonl").read_text().splitlines()
    assert lines
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        assert set(record) == FIELDS, number
        assert record["date"][:2] == "20" and record["machine"] and "bench/" in record["command"]
