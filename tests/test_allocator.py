"""gman.allocator: glibc's thresholds are set, and the opt-out leaves them alone."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from gman.allocator import keep_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# In a fresh process: malloc 20 MiB, print how much that added to glibc's mmap'ed blocks (mallinfo2().hblkhd)
PROBE = """
import ctypes
from gman.allocator import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
print(keep_freed_memory())
before = libc.mallinfo2().hblkhd
block = libc.malloc(20 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("GMAN_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize("tuning", ["1", "0"])
def test_a_20_mib_block_comes_from_the_reusable_heap_once_tuned(tuning):
    env = {**os.environ, "GMAN_MALLOC_TUNING": tuning}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    applied, mmapped = result.stdout.split()
    assert applied == ("True" if tuning == "1" else "False")
    # glibc's default threshold starts at 128 KiB: such a block is mmap'ed and unmapped again on free
    assert (int(mmapped) == 0) == (tuning == "1"), mmapped
