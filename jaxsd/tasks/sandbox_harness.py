"""Runs one model-written program and its tests inside the sandbox (jaxsd.tasks.sandbox).

Started as `python -I -S sandbox_harness.py` in fresh namespaces; it must import nothing from
jaxsd. It reads one JSON job from stdin, applies the resource limits, drops to the sandbox
uid, runs the program and the tests, and writes one report starting with the per-run nonce to
the result descriptor. The parent counts a pass only from a report with the right nonce, so a
program that exits early, dies or prints a fake "passed" line never passes.

Tests compare values strictly: every value a solution function returns must be data
(builtin types or their subclasses, copied into the builtin types through the builtins' own
methods) or a builtin iterator, so an object whose `__eq__` always says True cannot fake a
passing assert; the comparisons use references taken before the program ran, so patching
`builtins`, `sys.exit` or `os._exit` changes nothing here.
"""

import ast
import ctypes
import io
import json
import os
import resource
import sys
import traceback

# References captured before any model code runs.
_type, _repr, _len, _isinstance, _bool, _str = type, repr, len, isinstance, bool, str
_dict, _getattr, _enumerate, _exec, _compile = dict, getattr, enumerate, exec, compile
_issubclass = issubclass
_os_write, _os_exit, _os_close, _getpid = os.write, os._exit, os.close, os.getpid
_PLAIN_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
_list, _tuple, _set, _frozenset = list, tuple, set, frozenset
_int, _float, _complex, _bytes = int, float, complex, bytes
_format_exception = traceback.format_exception
_StringIO = io.StringIO
_loads, _dumps = json.loads, json.dumps
_MAX_DEPTH = 50


class _Fail(Exception):
    """A failed test: `info` becomes the report's `failure`."""

    def __init__(self, info):
        super().__init__(info.get("message", "test failed"))
        self.info = info


class _NotData(Exception):
    """A value that is not plain data (its type is named in the message)."""


def _data(value, depth=0):
    """A plain copy of `value`: subclasses of builtin data types become the builtin type
    (read through the builtin's own methods, so overridden ones are never called); any other
    object raises _NotData. Equality of the copies cannot be faked."""
    kind = _type(value)
    if kind in _PLAIN_SCALARS:
        return value
    if depth > _MAX_DEPTH:
        raise _NotData("a structure nested deeper than " + _str(_MAX_DEPTH))
    if kind is _list or kind is _tuple or kind is _set or kind is _frozenset:
        return kind(_data(v, depth + 1) for v in value)
    if kind is _dict:
        return {_data(k, depth + 1): _data(v, depth + 1) for k, v in value.items()}
    for base, convert in _SUBCLASS_CONVERSIONS:
        if _issubclass(kind, base):
            return convert(value, depth)
    raise _NotData(kind.__name__)


_SUBCLASS_CONVERSIONS = (
    (_int, lambda v, d: _int.__add__(v, 0)),
    (_float, lambda v, d: _float.__add__(v, 0.0)),
    (_complex, lambda v, d: _complex.__add__(v, 0j)),
    (_str, lambda v, d: _str.__add__(v, "")),
    (_bytes, lambda v, d: _bytes.__add__(v, b"")),
    (_dict, lambda v, d: {_data(k, d + 1): _data(x, d + 1) for k, x in _dict.items(v)}),
    (_list, lambda v, d: [_data(x, d + 1) for x in _list.__iter__(v)]),
    (_tuple, lambda v, d: _tuple(_data(x, d + 1) for x in _tuple.__iter__(v))),
    (_frozenset, lambda v, d: _frozenset(_data(x, d + 1) for x in _frozenset.__iter__(v))),
    (_set, lambda v, d: {_data(x, d + 1) for x in _set.__iter__(v)}),
)
# Lazy builtin iterators a solution may return (the test then builds a list from them).
_ITERATORS = frozenset(
    {type(x for x in ()), map, filter, zip, enumerate, reversed, range, type(iter([])),
     type(iter(())), type(iter("")), type(iter(range(0))), type({}.keys()), type({}.values()),
     type({}.items())}
)  # fmt: skip


def _show(value, limit):
    try:
        text = _repr(_data(value))
    except _NotData:
        text = "<object of type " + _type(value).__name__ + ">"
    return text if _len(text) <= limit else text[: limit - 3] + "..."


def _guard(fn, name):
    """Wrap a solution function: it must return data (handed on as a plain copy) or a builtin
    iterator; any other object fails the test that called it."""

    def guarded(*args, **kwargs):
        out = fn(*args, **kwargs)
        if _type(out) in _ITERATORS:
            return out
        try:
            return _data(out)
        except _NotData:
            raise _Fail(
                {
                    "message": name
                    + " returned an object of type "
                    + _type(out).__name__
                    + "; tests accept only data "
                    "(numbers, strings, lists, tuples, dicts, sets, None)",
                }
            ) from None

    guarded.__name__ = _getattr(fn, "__name__", name)
    return guarded


def _check_eq(actual, expected, source):
    try:
        same = _bool(_data(actual) == _data(expected))
    except _NotData:
        same = False
    if not same:
        raise _Fail(
            {"message": "assertion failed", "test": source,
             "expected": _show(expected, 400), "actual": _show(actual, 400)}
        )  # fmt: skip


def _check_true(value, source):
    try:
        holds = _bool(_data(value))
    except _NotData:
        holds = False
    if not holds:
        raise _Fail({"message": "assertion failed", "test": source, "actual": _show(value, 400)})


class _AssertRewriter(ast.NodeTransformer):
    """`assert a == b` -> `__jaxsd_eq(a, b, src)`; `assert e` -> `__jaxsd_true(e, src)`."""

    def __init__(self, source):
        self.source = source

    def visit_Assert(self, node):
        src = ast.get_source_segment(self.source, node) or "assert ..."
        test = node.test
        if (
            _isinstance(test, ast.Compare)
            and _len(test.ops) == 1
            and _isinstance(test.ops[0], ast.Eq)
        ):
            call = ast.Call(
                ast.Name("__jaxsd_eq", ast.Load()),
                [test.left, test.comparators[0], ast.Constant(src)], [],
            )  # fmt: skip
        else:
            call = ast.Call(ast.Name("__jaxsd_true", ast.Load()), [test, ast.Constant(src)], [])
        return ast.copy_location(ast.Expr(call), node)


def _compile_test(source):
    tree = _AssertRewriter(source).visit(ast.parse(source))
    return compile(ast.fix_missing_locations(tree), "<test>", "exec")


def _tail(exc, lines):
    text = "".join(_format_exception(_type(exc), exc, exc.__traceback__))
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])


def _test_namespace(program_globals):
    """The tests' globals: the program's names, functions guarded, our helpers last."""
    names = _dict(program_globals)
    for key, value in program_globals.items():
        if _type(value).__name__ == "function":
            names[key] = _guard(value, key)
    names["__jaxsd_eq"], names["__jaxsd_true"] = _check_eq, _check_true
    return names


def _run_program(code, name):
    """Exec the program; returns its globals or raises _Fail naming what went wrong."""
    g = {"__name__": name, "__builtins__": __builtins__}
    try:
        _exec(_compile(code, "<solution>", "exec"), g)
    except SystemExit as exc:
        raise _Fail(
            {"message": "the program called exit(" + _repr(exc.code)
             + ") before the tests ran; that never counts as a pass"}
        ) from None  # fmt: skip
    except _Fail:
        raise
    except BaseException as exc:  # noqa: BLE001 — any error of model code is its failure
        raise _Fail({"message": "the program raised an error", "error": _tail(exc, 6)}) from None
    return g


def _run_asserts(job):
    # Compiled before the program runs: the ast module is plain Python it could patch.
    compiled = [_compile_test(t) for t in [job.get("setup", "")] + job["tests"]]
    g = _run_program(job["code"], "__solution__")
    ns = _test_namespace(g)
    _exec(compiled[0], ns)
    for i, test in _enumerate(compiled[1:]):
        try:
            _exec(test, ns)
        except _Fail as fail:
            fail.info.setdefault("test", job["tests"][i])
            fail.info["index"] = i
            raise
        except BaseException as exc:  # noqa: BLE001
            raise _Fail(
                {"message": "the test raised an error", "test": job["tests"][i], "index": i,
                 "error": _tail(exc, 6)}
            ) from None  # fmt: skip
    return _len(job["tests"])


def _run_stdio(job):
    """LiveCodeBench stdin tests: the program runs once per case on its input."""
    for i, case in enumerate(job["tests"]):
        stdin, stdout = _StringIO(case["input"]), _StringIO()
        old = sys.stdin, sys.stdout
        sys.stdin, sys.stdout = stdin, stdout
        try:
            _run_program(job["code"], "__main__")
        except _Fail as fail:
            fail.info.update(index=i, input=_clip(case["input"]))
            raise
        finally:
            sys.stdin, sys.stdout = old
        got = stdout.getvalue()
        if _lines(got) != _lines(case["output"]):
            raise _Fail(
                {"message": "wrong output", "index": i, "input": _clip(case["input"]),
                 "expected": _clip(case["output"]), "actual": _clip(got)}
            )  # fmt: skip
    return _len(job["tests"])


def _run_functional(job):
    """LiveCodeBench LeetCode tests: one JSON argument per input line, JSON expected value."""
    name = job["func_name"]
    cases = [  # decoded before the program runs (json is plain Python it could patch)
        ([_loads(line) for line in case["input"].split("\n") if line.strip()],
         _loads(case["output"]), case["input"])
        for case in job["tests"]
    ]  # fmt: skip
    g = _run_program(job["code"], "__solution__")
    for i, (args, expected, stdin) in _enumerate(cases):
        try:
            fn = _getattr(g["Solution"](), name) if "Solution" in g else g[name]
            actual = _guard(fn, name)(*args)
        except _Fail as fail:
            fail.info.update(index=i, input=_clip(stdin))
            raise
        except BaseException as exc:  # noqa: BLE001
            raise _Fail(
                {"message": "the test raised an error", "index": i,
                 "input": _clip(stdin), "error": _tail(exc, 6)}
            ) from None  # fmt: skip
        if _type(actual) is tuple:
            actual = list(actual)  # JSON has no tuples
        _check_eq_case(actual, expected, i, stdin)
    return _len(cases)


def _check_eq_case(actual, expected, index, stdin):
    try:
        same = _bool(_data(actual) == expected)
    except _NotData:
        same = False
    if not same:
        raise _Fail(
            {"message": "wrong answer", "index": index, "input": _clip(stdin),
             "expected": _show(expected, 400), "actual": _show(actual, 400)}
        )  # fmt: skip


def _lines(text):
    return [line.strip() for line in text.strip().split("\n")]


def _clip(text, limit=400):
    return text if _len(text) <= limit else text[: limit - 3] + "..."


_RUNNERS = {"asserts": _run_asserts, "stdio": _run_stdio, "functional": _run_functional}


def _limit(kind, value):
    if value is not None:
        resource.setrlimit(kind, (value, value))


def _private_tmp(libc, uid):
    """Fresh tmpfs over the world-writable folders (our own mount namespace: the host never
    sees them; they vanish with the namespace); the program's home and TMPDIR live there."""
    for folder in _WORLD_WRITABLE:
        if os.path.isdir(folder):
            opts = b"size=64m,mode=1777"
            if libc.mount(b"tmpfs", folder.encode(), b"tmpfs", 6, opts) != 0:  # NOSUID|NODEV
                raise OSError(ctypes.get_errno(), "mount tmpfs on " + folder)
    home = "/tmp/home"
    os.mkdir(home, 0o700)
    if uid is not None:
        os.chown(home, uid, uid)
    os.environ["HOME"] = os.environ["TMPDIR"] = home


_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")


def _drop_privileges(job):
    libc = ctypes.CDLL(None, use_errno=True)
    uid = job.get("uid")
    if job.get("private_tmp"):
        _private_tmp(libc, uid)
    _limit(resource.RLIMIT_CPU, job["cpu_s"])
    _limit(resource.RLIMIT_AS, job["memory_bytes"])
    _limit(resource.RLIMIT_FSIZE, job["file_bytes"])
    _limit(resource.RLIMIT_NPROC, job["max_procs"])
    _limit(resource.RLIMIT_CORE, 0)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        # A change of uid clears the parent-death signal; set it again so that killing the
        # launcher always takes this process with it, even after the program calls setsid().
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def main():
    job = _loads(sys.stdin.read())
    sys.stdin.close()
    sys.stdin = _StringIO("")
    result_fd, nonce = job["result_fd"], job["nonce"]
    me = _getpid()
    _drop_privileges(job)
    report = {}
    try:
        report["passed"] = _RUNNERS[job["kind"]](job)
        report["ok"] = True
    except _Fail as fail:
        report.update(ok=False, failure=fail.info)
    except MemoryError:
        report.update(ok=False, failure={"message": "out of memory (address-space limit)"})
    except RecursionError:
        report.update(ok=False, failure={"message": "maximum recursion depth exceeded"})
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 — the program may have replaced or closed them
        pass
    if _getpid() != me:  # a process the program forked: only the harness itself reports
        _os_exit(1)
    # The verdict line is built by string operations only (nothing the program can patch);
    # the failure details that follow only shape the feedback text.
    verdict = "ok" if report.get("ok") else "fail"
    details = _repr(report.get("failure"))  # dict of str/int: repr is C code, json is not
    data = nonce + "\n" + verdict + "\n" + _str(report.get("passed", 0)) + "\n" + details
    data = data.encode()
    while data:
        data = data[_os_write(result_fd, data) :]
    _os_close(result_fd)
    _os_exit(0)  # skip atexit hooks the program may have registered


if __name__ == "__main__":
    main()
