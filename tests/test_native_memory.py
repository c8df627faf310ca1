"""The heap settings of a CPU forward pass (native_memory.py), counted in page faults: a process
that frees and re-allocates a forward pass's worth of tensors, with glibc's defaults and with
`keep_freed_memory_for_tensors`. Each runs in its own process (the settings are process-wide)."""

import resource
import subprocess
import sys

import pytest

from featurescribe.native_memory import _libc

REALLOCATE = """
import resource, sys
import torch
from featurescribe.native_memory import keep_freed_memory_for_tensors, return_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory_for_tensors() and keep_freed_memory_for_tensors()

def one_batch():  # eight 12 MiB activations, all alive at once, then freed
    acts = [torch.ones(3 << 20) for _ in range(8)]
    return sum(float(a[0]) for a in acts)

one_batch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
return_freed_memory()
"""

PAGES_PER_BATCH = 8 * (12 << 20) // resource.getpagesize()


def faults_of_five_batches(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_libc() is None, reason="glibc only")
def test_kept_tensor_memory_is_reused_without_page_faults():
    default, kept = faults_of_five_batches("default"), faults_of_five_batches("keep")
    assert default > 4 * PAGES_PER_BATCH  # glibc's defaults hand the memory back after every batch
    assert kept < PAGES_PER_BATCH // 4  # measured with 4 KiB pages: 122,674 against 3,072
