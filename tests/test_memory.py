"""memory.py: freed activation memory stays in the process, so a second pass does not fault it in.

Each case runs in a fresh interpreter: the setting is process-wide and made once."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
import torch
from hookedcot.memory import retain_freed_memory
applied = retain_freed_memory()

def allocate_and_free():
    # 48 blocks of 4 MiB: below glibc's mmap threshold, so they come from the heap like a cache's tensors
    blocks = [torch.ones(2**20) for _ in range(48)]
    del blocks

allocate_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
allocate_and_free()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting exists on glibc only"
)


def _second_pass_faults(env_value: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "HOOKEDCOT_RETAIN_FREED_MEMORY"}
    if env_value is not None:
        env["HOOKEDCOT_RETAIN_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _second_pass_faults(None)
    assert applied
    # returned to the OS, 192 MiB is 49,152 faults of 4 KiB; kept, only stray first-use pages fault
    assert faults < 5000, f"{faults} minor faults re-allocating 192 MiB that was just freed"


@glibc_only
def test_opt_out_returns_memory_to_the_os():
    applied, faults = _second_pass_faults("0")
    assert not applied
    # 192 MiB faulted in again: at least one fault per 2 MiB even with transparent huge pages
    assert faults > 96
