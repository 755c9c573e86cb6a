"""The sandbox contains what a model might write: each attack runs in one batch beside honest
programs, is reported as a failure with a clear reason, and leaves the trainer (this process,
its files, its environment, its network) untouched."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import threading
import time
import warnings

import pytest

from jaxsd.tasks import sandbox as sandbox_lib
from jaxsd.tasks.sandbox import Job, Sandbox, SandboxLimits

TEST = ("assert add(1, 2) == 3", "assert add(-1, 1) == 0")
GOOD = "def add(a, b):\n    return a + b\n"
SECRET = "jaxsd-test-secret-7f3a9c"
TMP_ESCAPE = pathlib.Path(f"/tmp/jaxsd-sandbox-escape-{os.getpid()}.txt")


def attacks(home: pathlib.Path, outside: pathlib.Path, port: int) -> dict[str, str]:
    """Programs that, if an attack works, go on to define a correct `add` (so a leak passes)."""
    return {
        "infinite_loop": "while True:\n    pass\n",
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
        "allocate_10gb": "x = bytearray(10 * 1024 ** 3)\n" + GOOD,
        "write_outside": f"open({str(outside)!r}, 'w').write('x')\n" + GOOD,
        "write_parent_dir": "open('../escaped.txt', 'w').write('x')\n" + GOOD,
        "write_tmp": (  # allowed, but into the namespace's own tmpfs: the host never sees it
            f"open({str(TMP_ESCAPE)!r}, 'w').write('x')\nimport os\n"
            "open(os.path.expanduser('~/x'), 'w').write('x')\n" + GOOD
        ),
        "delete_home": (
            "import os, shutil\nshutil.rmtree(os.path.expanduser('~'), ignore_errors=True)\n"
            f"os.remove({str(home / 'canary.txt')!r})\n" + GOOD
        ),
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)\n" + GOOD,
        "kill_parent": (
            f"import os, signal\nos.kill({os.getpid()}, signal.SIGUSR1)\n"
            "os.kill(os.getppid(), signal.SIGKILL)\n" + GOOD
        ),
        "print_100mb": "import sys\nsys.stdout.write('x' * 100_000_000)\n" + GOOD,
        "read_env": (
            "import os, glob\nfound = [k for k, v in os.environ.items() if "
            f"{SECRET!r} in v]\n"
            "for path in glob.glob('/proc/*/environ'):\n"
            "    try:\n"
            f"        found += [path] if {SECRET!r} in open(path).read() else []\n"
            "    except OSError:\n"
            "        pass\n"
            "print(found)\nassert found, 'no secret visible'\n" + GOOD
        ),
        "exit_before_tests": "import sys\nsys.exit(0)\n" + GOOD,
        "os_exit_before_tests": "import os\nos._exit(0)\n",
        "always_equal": (
            "class Anything:\n    def __eq__(self, other):\n        return True\n"
            "def add(a, b):\n    return Anything()\n"
        ),
        "patch_builtins": (
            "import builtins, sys, os, atexit\n"
            "builtins.AssertionError = type('Fine', (Exception,), {})\n"
            "builtins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: int\n"
            "sys.exit = os._exit = lambda *a: None\n"
            "def add(a, b):\n    return 0\n"
        ),
        "forge_report": (
            "import os\nfor fd in range(3, 4096):\n    try:\n"
            "        os.write(fd, b'0' * 32 + b'\\nok\\n2\\nnull')\n"
            "    except OSError:\n        pass\n"
            "print('all 2 tests passed')\nos._exit(0)\n"
        ),
    }


EXPECTED = {  # status and a phrase of the reason (or of the failure's error text)
    "infinite_loop": ("timeout", "time limit"),
    "fork_bomb": (None, None),  # either the process limit error or the time limit
    "allocate_10gb": ("failed", "MemoryError"),
    "write_outside": ("failed", "PermissionError"),
    "write_parent_dir": ("failed", "PermissionError"),
    "write_tmp": ("passed", "all 2 tests passed"),
    "delete_home": ("failed", "PermissionError"),
    "socket": ("failed", "OSError"),
    "kill_parent": (None, None),
    "print_100mb": ("output_limit", "output limit"),
    "read_env": ("failed", "no secret visible"),
    "exit_before_tests": ("failed", "exit(0)"),
    "os_exit_before_tests": ("crashed", "exited with code 0"),
    "always_equal": ("failed", "object of type Anything"),
    "patch_builtins": ("failed", "assertion failed"),
    "forge_report": ("crashed", "nonce"),
}


@pytest.fixture(scope="module")
def batch():
    """Run every attack and honest programs in one batch; record the trainer's side."""
    # The trainer's files live outside /tmp (which the sandbox replaces by its own tmpfs), in
    # this user's real home, as a model's `rm -rf ~` would find them.
    root = pathlib.Path.home() / f".jaxsd-sandbox-test-{os.getpid()}"
    home = root / "home"
    home.mkdir(parents=True)
    (home / "canary.txt").write_text("keep me")
    outside = root / "outside.txt"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    signals = []
    old = signal.signal(signal.SIGUSR1, lambda *a: signals.append(a))
    os.environ["JAXSD_TEST_SECRET"] = SECRET
    progs = attacks(home, outside, listener.getsockname()[1])
    jobs = [Job(code, TEST) for code in progs.values()] + [Job(GOOD, TEST)] * 8
    limits = SandboxLimits(timeout_s=2.0, max_output_bytes=1 << 20)
    try:
        with Sandbox(limits, workers=24) as sb:
            results = sb.run_many(jobs)
            canary = (home / "canary.txt").read_text()
            escaped = [p.exists() for p in (outside, sb._root / "escaped.txt")]
            leftovers = sandbox_processes(wait_s=2.0)
            after = sb.run(Job(GOOD, TEST))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        del os.environ["JAXSD_TEST_SECRET"]
        signal.signal(signal.SIGUSR1, old)
        stop.set()
        thread.join()
        listener.close()
    return {
        "results": dict(zip(progs, results, strict=False)),
        "honest": results[len(progs) :],
        "after": after,
        "canary": canary,
        "escaped": escaped,
        "accepted": accepted,
        "signals": signals,
        "leftovers": leftovers,
    }


def sandbox_processes(wait_s: float) -> list[str]:
    """Live processes owned by a sandbox uid, after up to `wait_s` for the kernel to reap the
    namespaces' last members (their SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for entry in pathlib.Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and entry.stat().st_uid >= sandbox_lib._UID_BASE:
                    found.append((entry / "status").read_text().split("\n", 3)[:3])
            except OSError:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attack_is_contained_and_fails_with_a_reason(batch, name):
    """Every attack fails with its reason; a write to /tmp is allowed (private tmpfs)."""
    result = batch["results"][name]
    status, phrase = EXPECTED[name]
    assert result.passed == (status == "passed"), (name, result)
    if status is not None:
        assert result.status == status, (name, result.status, result.reason, result.failure)
        text = result.reason + str(result.failure or "")
        assert phrase in text, (name, text)
    assert result.reason.strip()


def test_honest_programs_in_the_same_batch_pass_and_the_trainer_goes_on(batch):
    assert all(r.passed and r.tests_passed == 2 for r in batch["honest"])
    assert batch["after"].passed


def test_trainer_files_network_signals_and_environment_are_untouched(batch):
    assert batch["canary"] == "keep me"
    assert batch["escaped"] == [False, False]
    assert not TMP_ESCAPE.exists()
    assert batch["accepted"] == []
    assert batch["signals"] == []
    assert SECRET not in batch["results"]["read_env"].stdout
    assert batch["leftovers"] == []  # the fork bomb's children died with their namespace


def test_output_is_truncated_and_the_fork_bomb_hits_the_process_limit(batch):
    flood = batch["results"]["print_100mb"]
    assert len(flood.stdout) <= SandboxLimits().keep_bytes
    bomb = batch["results"]["fork_bomb"]
    assert bomb.status in ("timeout", "failed", "crashed")
    assert bomb.wall_s < 2.0 + 1.0


def test_feedback_names_the_failing_test_expected_and_actual():
    with Sandbox(SandboxLimits(timeout_s=5.0), workers=2) as sb:
        wrong = sb.run(Job("def add(a, b):\n    return a - b\n", TEST))
        raises = sb.run(Job("def add(a, b):\n    return a / 0\n", TEST))
    assert wrong.status == "failed"
    assert wrong.failure["test"] == TEST[0]
    assert (wrong.failure["expected"], wrong.failure["actual"]) == ("3", "-1")
    assert raises.failure["test"] == TEST[0]
    assert "ZeroDivisionError: division by zero" in raises.failure["error"]


def test_stdio_and_functional_tests():
    echo = "n = int(input())\nprint(n * 2)\n"
    cases = ({"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10"})
    solution = "class Solution:\n    def twice(self, xs):\n        return [2 * x for x in xs]\n"
    with Sandbox(SandboxLimits(timeout_s=5.0), workers=2) as sb:
        ok = sb.run(Job(echo, cases, kind="stdio"))
        bad = sb.run(Job("print(1)", cases, kind="stdio"))
        fn = sb.run(Job(solution, ({"input": "[1, 2]", "output": "[2, 4]"},), "functional",
                        func_name="twice"))  # fmt: skip
    assert ok.passed and ok.tests_passed == 2
    assert bad.status == "failed" and bad.failure["expected"] == "6\n"
    assert bad.failure["actual"] == "1\n" and bad.failure["input"] == "3\n"
    assert fn.passed


def test_missing_isolation_is_named_in_a_warning(monkeypatch):
    monkeypatch.setattr(sandbox_lib.shutil, "which", lambda name: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iso = sandbox_lib.probe_isolation.__wrapped__()
    assert iso.unshare == ()
    assert any("unshare" in str(w.message) for w in caught)


def test_bad_limits_name_the_key():
    with pytest.raises(ValueError, match="sandbox.timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="sandbox.max_output_bytes"):
        SandboxLimits(keep_bytes=100, max_output_bytes=10)
