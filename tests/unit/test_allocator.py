"""``hooks.keep_freed_memory``: glibc keeps freed blocks (resident, reused) instead of returning them."""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

CHILD = r"""
import json, os, resource, sys, torch
import hooks
took = hooks.keep_freed_memory(sys.argv[1] == "keep")
n = (24 << 20) // 4          # 24 MiB of float32: above the 128 KiB default, under glibc's 32 MiB ceiling
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(n)
held = rss(); del x; dropped = held - rss()        # what freeing the block gave back to the kernel
x = torch.ones(n); del x                           # warm up: the block exists once
before, total = faults(), 0.0
for _ in range(5):                                 # allocate, touch, free the same size again and again
    y = torch.ones(n); total += float(y.sum()); del y
print(json.dumps({"took": took, "dropped": dropped, "faults": faults() - before, "total": total}))
"""


def _run(mode):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_kept_block_stays_resident_and_is_reused():
    size, pages = 24 << 20, (24 << 20) // 4096
    keep, give_back = _run("keep"), _run("return")
    assert keep["took"] and give_back["took"]
    assert keep["total"] == give_back["total"] == 5 * size // 4
    # glibc's default thresholds: the block is unmapped on free and faulted in afresh every time
    assert give_back["dropped"] >= 0.9 * size and give_back["faults"] >= 0.9 * 5 * pages
    # kept: nothing goes back to the kernel; at most one fresh block (heap layout), then reuse
    assert keep["dropped"] <= 0.05 * size and keep["faults"] <= 1.2 * pages
