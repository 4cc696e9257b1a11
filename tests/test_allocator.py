"""keep_freed_memory keeps a freed large activation resident for reuse; return_freed_memory hands it back."""

import subprocess
import sys

import pytest

from bilevel_maml.allocator import _glibc

PROBE = """
import os, torch
from bilevel_maml.allocator import keep_freed_memory, return_freed_memory

def resident_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def left_resident_after_free():
    before = resident_mb()
    block = torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MB, above glibc's largest default mmap threshold
    del block
    return resident_mb() - before

assert {setting}()
print(left_resident_after_free())
"""


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
@pytest.mark.parametrize("setting, kept", [("keep_freed_memory", True), ("return_freed_memory", False)])
def test_freed_memory_is_kept_or_returned(setting, kept):
    done = subprocess.run([sys.executable, "-c", PROBE.format(setting=setting)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resident_after_free = float(done.stdout)
    if kept:
        assert resident_after_free > 60
    else:
        assert resident_after_free < 4
