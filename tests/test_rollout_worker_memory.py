"""The rollout worker keeps freed host memory for in-place reloads (glibc's mallopt)."""

import platform
import subprocess
import sys

# Allocate, touch and free a 64 MB block (over glibc's largest dynamic mmap threshold, 32 MB)
# four times, as a reload does with each large tensor, and count the minor page faults.
_SCRIPT = """
import ctypes, resource, sys
from jaxsd.rollout.vllm_server import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def touch_and_free():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch_and_free()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _page_faults_per_block(mode: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])


def test_a_freed_64mb_block_is_reused_without_page_faults_once_the_worker_keeps_memory():
    if platform.libc_ver()[0] != "glibc":
        # Elsewhere the worker must leave the allocator alone and say so.
        from jaxsd.rollout.vllm_server import keep_freed_host_memory

        assert keep_freed_host_memory() is False
        return
    # By default every block is a fresh mmap: one fault per 4 kB page (16,384), fewer only
    # where the kernel backs it with transparent huge pages on its own.
    assert _page_faults_per_block("default") > 1000
    assert _page_faults_per_block("keep") < 50
