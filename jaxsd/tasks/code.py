"""Code tasks: MBPP, HumanEval and LiveCodeBench, verified by running tests in the sandbox.

The response's last fenced code block is the program. It runs in `jaxsd.tasks.sandbox` (never in
this process); reward is 1 iff every test passes. Feedback follows SDPO's rich-feedback code
setting: the first failing test's input, expected and actual output, or the last lines of the
error, truncated to `feedback_tokens`. The SDPO reprompt uses it when no sibling succeeded
(METHODS §1; `jaxsd.tasks.reprompt`).

Records carry `tests` (a tuple), `kind` ("asserts" | "stdio" | "functional"), `setup` and
`func_name` besides the protocol's `id`, `system`, `prompt` and `answer` (the reference
solution, "" when the source has none).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import zlib
from collections.abc import Sequence
from typing import Any

from jaxsd.tasks.base import (
    RecordError,
    Verdict,
    chat,
    load_json_rows,
    register_task,
    require,
    resolve_data_file,
    where,
)
from jaxsd.tasks.sandbox import ExecResult, Job, Sandbox, SandboxLimits

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_PIECE_RE = re.compile(r"\w+|[^\w\s]")
NO_CODE_FEEDBACK = "No ```python code block was found in the response; put the program in one."

# MBPP's prompt (Austin et al. 2021, as the bigcode evaluation harness writes it), and the
# instruction a chat model needs to return a code block.
MBPP_PROMPT = (
    "You are an expert Python programmer, and here is your task: {text} "
    "Your code should pass these tests:\n\n{tests}\n"
)
CODE_BLOCK_INSTRUCTION = "Write your solution in a ```python code block."
HUMANEVAL_PROMPT = (
    "Complete the following Python function. Reply with the complete function in a "
    "```python code block.\n\n```python\n{prompt}```"
)
# LiveCodeBench's code-generation prompt (lcb_runner/prompts/code_generation.py).
LCB_SYSTEM = (
    "You are an expert Python programmer. You will be given a question (problem specification) "
    "and will generate a correct Python program that matches the specification and passes all "
    "tests."
)
LCB_WITH_STARTER = (
    "You will use the following starter code to write the solution to the problem and enclose "
    "your code within delimiters."
)
LCB_STDIN = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not "
    "directly test on the sample inputs). Enclose your code within delimiters as follows. "
    "Ensure that when the python program runs, it reads the inputs, runs the algorithm and "
    "writes output to STDOUT."
)

# MBPP's official split by task_id (google-research mbpp/README.md; the Hugging Face split).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600),
               "train": (601, 974)}  # fmt: skip
# At the shipped revision these reference solutions fail their own asserts, so no program can
# be judged against them reliably; they are dropped unless keep_broken=True.
MBPP_BROKEN = frozenset({341, 596, 642})


def extract_code(response: str) -> str | None:
    """The last fenced code block (a python/py/unlabelled one preferred), or None."""
    blocks = _FENCE_RE.findall(response)
    if not blocks:
        return None
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3", "")]
    return (python or [body for _, body in blocks])[-1]


def truncate_tokens(text: str, budget: int) -> str:
    """Keep the first `budget` word/punctuation pieces of `text` (a tokenizer-free budget that
    sits below a BPE count for code, so the teacher prompt stays bounded), marking the cut."""
    if budget < 1:
        raise ValueError(f"feedback_tokens={budget} must be >= 1")
    for count, match in enumerate(_PIECE_RE.finditer(text)):
        if count == budget:
            return text[: match.start()].rstrip() + "\n... (feedback truncated)"
    return text


def feedback_text(result: ExecResult) -> str | None:
    """SDPO-style environment feedback for a failed run; None when it passed."""
    if result.passed:
        return None
    failure = result.failure or {}
    if result.status != "failed" or not failure:
        text = f"Your program did not finish: {result.reason}."
        tail = [ln for ln in result.stderr.strip().splitlines() if ln.strip()][-5:]
        return text + ("\n" + "\n".join(tail) if tail else "")
    message = str(failure.get("message", "test failed"))
    test = failure.get("test")
    if test is None and "index" in failure:
        test = f"test {failure['index'] + 1}"
    parts = [message[:1].upper() + message[1:] + (f": {test}" if test else "")]
    if "input" in failure:
        parts.append(f"Input:\n{failure['input']}")
    if "expected" in failure:
        parts.append(f"Expected:\n{failure['expected']}")
    if "actual" in failure:
        parts.append(f"Got:\n{failure['actual']}")
    if "error" in failure:
        parts.append(failure["error"])
    return "\n".join(parts)


class CodeTask:
    """Shared verifier of the code tasks: sandboxed tests, rich feedback, a batch path."""

    name = "code"

    def __init__(
        self,
        feedback_tokens: int = 256,
        sandbox: dict[str, Any] | None = None,
        workers: int = 64,
    ) -> None:
        if feedback_tokens < 1:
            raise ValueError(f"task.kwargs.feedback_tokens={feedback_tokens} must be >= 1")
        self.feedback_tokens = feedback_tokens
        self.limits = SandboxLimits(**dict(sandbox or {}))
        self.workers = workers
        self._sandbox: Sandbox | None = None

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:  # built on first use: loading data needs no processes
            self._sandbox = Sandbox(self.limits, workers=self.workers)
        return self._sandbox

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """The benchmark's prompt as the user turn (and its system message, if any)."""
        return chat(record["system"], record["prompt"])

    def program(self, code: str, record: dict[str, Any]) -> str:
        """The program that runs for an extracted code block (HumanEval adds its header)."""
        return code

    def job(self, response: str, record: dict[str, Any]) -> Job | None:
        code = extract_code(response)
        if code is None:
            return None
        return Job(
            self.program(code, record),
            tuple(record["tests"]),
            record["kind"],
            record.get("setup", ""),
            record.get("func_name", ""),
        )

    def verdict(self, job: Job | None, result: ExecResult | None) -> Verdict:
        if job is None or result is None:
            return Verdict(0.0, NO_CODE_FEEDBACK, None)
        feedback = feedback_text(result)
        if feedback is not None:
            feedback = truncate_tokens(feedback, self.feedback_tokens)
        return Verdict(float(result.passed), feedback, _fingerprint(job.code))

    def verify(self, response: str, record: dict[str, Any]) -> Verdict:
        """Run the response's program against the record's tests (one sandboxed process)."""
        return self.verify_many([response], [record])[0]

    def verify_many(
        self, responses: Sequence[str], records: Sequence[dict[str, Any]]
    ) -> list[Verdict]:
        """Verify a batch: every program runs at once in the sandbox's worker pool."""
        jobs = [self.job(r, rec) for r, rec in zip(responses, records, strict=True)]
        todo = [j for j in jobs if j is not None]
        results = iter(self.sandbox.run_many(todo) if todo else [])
        return [self.verdict(j, next(results) if j is not None else None) for j in jobs]


def _fingerprint(code: str) -> str:
    """What maj@k votes on: the program with blank lines and trailing spaces ignored."""
    canon = "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())
    return hashlib.sha1(canon.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- MBPP


class MbppTask(CodeTask):
    """MBPP (974 problems), split by task_id as the benchmark does (MBPP_SPLITS)."""

    name = "mbpp"

    def __init__(self, keep_broken: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_broken = keep_broken

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Records of `split` (train | validation | test | prompt)."""
        if split not in MBPP_SPLITS:
            raise ValueError(f"mbpp: split {split!r}; use one of {sorted(MBPP_SPLITS)}")
        lo, hi = MBPP_SPLITS[split]
        path = resolve_data_file(data_dir, "mbpp/mbpp.jsonl")
        records = []
        for i, row in enumerate(load_json_rows(path)):
            loc = where(path, i)
            task_id = require(row, "task_id", int, loc)
            if lo <= task_id <= hi and (self.keep_broken or task_id not in MBPP_BROKEN):
                records.append(mbpp_record(row, loc))
        return records


def mbpp_record(row: dict[str, Any], loc: str) -> dict[str, Any]:
    tests = require(row, "test_list", list, loc)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise RecordError(f"{loc}: field 'test_list' must be a non-empty list of strings")
    text = require(row, "text", str, loc)
    prompt = MBPP_PROMPT.format(text=text, tests="\n".join(tests)) + CODE_BLOCK_INSTRUCTION
    return {
        "id": f"mbpp/{row['task_id']}",
        "system": None,
        "prompt": prompt,
        "answer": require(row, "code", str, loc),
        "tests": tuple(tests),
        "kind": "asserts",
        "setup": row.get("test_setup_code") or "",
    }


# ----------------------------------------------------------------------------- HumanEval


class HumanEvalTask(CodeTask):
    """HumanEval (164 problems, evaluation only: every split name gives all of them)."""

    name = "humaneval"

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """All 164 records (HumanEval has no training split)."""
        path = resolve_data_file(data_dir, "humaneval/HumanEval.jsonl")
        return [humaneval_record(row, where(path, i)) for i, row in enumerate(load_json_rows(path))]

    def program(self, code: str, record: dict[str, Any]) -> str:
        """A full function keeps the prompt's imports; a bare body completes the prompt."""
        if re.search(rf"def\s+{re.escape(record['func_name'])}\s*\(", code):
            lines = record["stub"].splitlines()
            header = [ln for ln in lines if ln.startswith(("import ", "from "))]
            return "\n".join([*header, code])
        return record["stub"] + code


def humaneval_record(row: dict[str, Any], loc: str) -> dict[str, Any]:
    stub = require(row, "prompt", str, loc)
    entry = require(row, "entry_point", str, loc)
    test = require(row, "test", str, loc)
    return {
        "id": require(row, "task_id", str, loc),
        "system": None,
        "prompt": HUMANEVAL_PROMPT.format(prompt=stub),
        "answer": stub + require(row, "canonical_solution", str, loc),
        "tests": (f"{test}\ncheck({entry})\n",),
        "kind": "asserts",
        "func_name": entry,
        "stub": stub,
    }


# ----------------------------------------------------------------------------- LiveCodeBench


class LiveCodeBenchTask(CodeTask):
    """LiveCodeBench code generation from a local JSON-lines file in its release format
    (`code_generation_lite`): records sorted by contest_date, the earliest (1 - test_fraction)
    form "train", the rest "test" (later problems: what the benchmark's date cut-off is for)."""

    name = "livecodebench"

    def __init__(self, path: str = "livecodebench/test.jsonl", test_fraction: float = 1.0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        if not 0.0 <= test_fraction <= 1.0:
            raise ValueError(f"task.kwargs.test_fraction={test_fraction} must be in [0, 1]")
        self.path, self.test_fraction = path, test_fraction

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Records of `split` ("train" | "test" | "all")."""
        if split not in ("train", "test", "all"):
            raise ValueError(f"livecodebench: split {split!r}; use 'train', 'test' or 'all'")
        path = pathlib.Path(self.path)
        if not path.is_absolute() and not path.is_file():
            path = resolve_data_file(data_dir, self.path)
        elif not path.is_file():
            raise FileNotFoundError(f"task.kwargs.path={self.path!r}: no such LiveCodeBench file")
        rows = load_json_rows(path)
        records = [lcb_record(row, where(path, i)) for i, row in enumerate(rows)]
        records.sort(key=lambda r: (r["date"], r["id"]))
        cut = round(len(records) * (1.0 - self.test_fraction))
        return {"train": records[:cut], "test": records[cut:], "all": records}[split]


def lcb_record(row: dict[str, Any], loc: str) -> dict[str, Any]:
    """One LiveCodeBench row -> a record; tests = public + private cases, one kind per problem."""
    content = require(row, "question_content", str, loc)
    starter = row.get("starter_code") or ""
    cases = _lcb_cases(require(row, "public_test_cases", (str, list), loc), loc, "public")
    private = row.get("private_test_cases")
    if private:
        cases += _lcb_cases(private, loc, "private")
    if not cases:
        raise RecordError(f"{loc}: no test cases in 'public_test_cases'/'private_test_cases'")
    kinds = {c.get("testtype", "stdin") for c in cases}
    if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
        raise RecordError(f"{loc}: testtype must be all 'stdin' or all 'functional', got {kinds}")
    functional = kinds == {"functional"}
    func_name = ""
    if functional:
        meta = row.get("metadata") or "{}"
        meta = json.loads(meta) if isinstance(meta, str) else meta
        func_name = meta.get("func_name", "")
        if not func_name:
            raise RecordError(f"{loc}: functional tests need 'metadata' with a 'func_name'")
    prompt = f"### Question:\n{content}\n\n"
    if starter:
        prompt += f"### Format: {LCB_WITH_STARTER}\n```python\n{starter}\n```\n\n"
    else:
        prompt += f"### Format: {LCB_STDIN}\n```python\n# YOUR CODE HERE\n```\n\n"
    prompt += "### Answer: (use the provided format with backticks)\n\n"
    return {
        "id": f"livecodebench/{require(row, 'question_id', str, loc)}",
        "system": LCB_SYSTEM,
        "prompt": prompt,
        "answer": "",
        "tests": tuple({"input": c["input"], "output": c["output"]} for c in cases),
        "kind": "functional" if functional else "stdio",
        "func_name": func_name,
        "date": str(row.get("contest_date") or ""),
    }


class _StrOnly(pickle.Unpickler):
    """LiveCodeBench pickles a JSON string; refuse anything that is not plain data."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case blob")


def _lcb_cases(value: str | list, loc: str, field: str) -> list[dict[str, Any]]:
    """Test cases from a JSON string, a list, or the lite release's base64(zlib(pickle(json)))."""
    if isinstance(value, list):
        cases = value
    else:
        try:
            cases = json.loads(value)
        except ValueError:
            try:
                blob = zlib.decompress(base64.b64decode(value))
                cases = json.loads(_StrOnly(io.BytesIO(blob)).load())
            except Exception as err:
                raise RecordError(
                    f"{loc}: field '{field}_test_cases' is neither JSON nor LiveCodeBench's "
                    f"compressed form ({type(err).__name__}: {err})"
                ) from err
    if not isinstance(cases, list):
        raise RecordError(f"{loc}: field '{field}_test_cases' must be a list of test cases")
    for k, case in enumerate(cases):
        if not isinstance(case, dict):
            raise RecordError(f"{loc}: {field} test case {k} must be an object")
        require(case, "input", str, f"{loc} {field} test case {k}")
        require(case, "output", str, f"{loc} {field} test case {k}")
    return cases


register_task("mbpp", MbppTask)
register_task("humaneval", HumanEvalTask)
register_task("livecodebench", LiveCodeBenchTask)
