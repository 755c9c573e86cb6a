"""The rollout worker keeps freed host memory for in-place reloads (glibc's mallopt)."""

import platform
import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MB block (over glibc's largest dynamic mmap threshold, 32 MB)
# four times, as each weights step does with each large tensor, and count the minor page
# faults. `thread`: the four rounds run in fresh threads, as TensorStore's restore threads
# allocate the arrays of each step.
_SCRIPT = """
import ctypes, resource, sys, threading
from jaxsd.rollout.vllm_server import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def touch_and_free():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
def in_a_new_thread():
    worker = threading.Thread(target=touch_and_free)
    worker.start()
    worker.join()
round_ = in_a_new_thread if sys.argv[2] == "thread" else touch_and_free
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _page_faults_per_block(mode: str, where: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, where], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])


@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_freed_64mb_block_is_reused_without_page_faults_once_the_worker_keeps_memory(where):
    if platform.libc_ver()[0] != "glibc":
        # Elsewhere the worker must leave the allocator alone and say so.
        from jaxsd.rollout.vllm_server import keep_freed_host_memory

        assert keep_freed_host_memory() is False
        return
    # By default every block is a fresh mmap: one fault per 4 kB page (16,384), fewer only
    # where the kernel backs it with transparent huge pages on its own. A new thread's block
    # is reused only because all threads share one arena (a thread's own arena heap is at
    # most 64 MB, so the block would be a fresh mmap again). A thread's start touches a few
    # pages of its stack.
    assert _page_faults_per_block("default", where) > 1000
    assert _page_faults_per_block("keep", where) < 100
