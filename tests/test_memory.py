"""memory.py: keeping freed memory in the process is an explicit opt-in, never a side effect of
using a model; opted in, a second pass does not fault freed memory in again.

The fault counts run in a fresh interpreter each: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from model_factory import random_model

import hookedcot
from hookedcot import ModelConfig, memory

CHILD = r"""
import resource, sys
import torch
import hookedcot

if sys.argv[1] == "opt_in":
    applied = hookedcot.retain_freed_memory()
else:  # build and run a model, without opting in
    from hookedcot import HookedCoT, ModelConfig
    model = HookedCoT(ModelConfig(n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=50))
    model.run_with_cache(torch.zeros(1, 4, dtype=torch.long))
    applied = False

def allocate_and_free():
    # 48 blocks of 4 MiB: below glibc's mmap threshold, so they come from the heap like a cache's tensors
    blocks = [torch.ones(2**20) for _ in range(48)]
    del blocks

allocate_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
allocate_and_free()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=50)

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting exists on glibc only"
)


def _second_pass_faults(case: str, env_value: str | None = None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "HOOKEDCOT_RETAIN_FREED_MEMORY"}
    if env_value is not None:
        env["HOOKEDCOT_RETAIN_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD, case], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_building_and_running_a_model_never_sets_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_apply", lambda: calls.append(1) or False)
    monkeypatch.setattr(memory, "_applied", None)
    model = random_model(CFG)
    tokens = torch.randint(0, CFG.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    model(tokens)
    model.run_with_cache(tokens)
    model.generate(tokens, max_new_tokens=2, stop_at_eos=False)
    assert calls == []
    hookedcot.retain_freed_memory()
    assert calls == [1]  # the opt-in is the only way in


@glibc_only
def test_without_the_opt_in_freed_memory_goes_back_to_the_os():
    applied, faults = _second_pass_faults("model")
    assert not applied
    # 192 MiB faulted in again: at least one fault per 2 MiB even with transparent huge pages
    assert faults > 96, f"only {faults} minor faults re-allocating 192 MiB: did building a model change the allocator?"


@glibc_only
def test_opted_in_freed_memory_is_reused_without_page_faults():
    applied, faults = _second_pass_faults("opt_in")
    assert applied
    # returned to the OS, 192 MiB is 49,152 faults of 4 KiB; kept, only stray first-use pages fault
    assert faults < 5000, f"{faults} minor faults re-allocating 192 MiB that was just freed"


@glibc_only
def test_the_environment_opt_out_makes_the_opt_in_a_no_op():
    applied, faults = _second_pass_faults("opt_in", env_value="0")
    assert not applied
    assert faults > 96
