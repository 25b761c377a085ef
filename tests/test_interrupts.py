"""A Ctrl-C can land anywhere: a KeyboardInterrupt raised at every line hookedcot executes during
a call (sampled in the suite, every line when marked slow) leaves no hook attached, the KV cache
and grad mode as they were, and the next call's logits bit for bit clean.

A hook that raises (test_hygiene.py) only interrupts at hook points; a real interrupt arrives
between any two lines, e.g. between installing a block's hooks and entering the `try` that removes
them. `sys.settrace` lets the test raise at the k-th line event of hookedcot's own code (a trace
function's exception is raised in the traced frame at that line)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from model_factory import random_model

import hookedcot
from hookedcot import ModelConfig
from hookedcot.hook_points import _SCOPED, scoped_hooks
from hookedcot.interp import patch_layer_position
from hookedcot.kv_cache import KVCache

CFG = ModelConfig(n_layers=2, d_model=16, n_heads=2, n_key_value_heads=1, d_head=8, d_mlp=32, d_vocab=64)
TOKENS = torch.randint(0, CFG.d_vocab, (2, 5), generator=torch.Generator().manual_seed(11))
PACKAGE = os.path.dirname(hookedcot.__file__) + os.sep
CI_SAMPLES = 60  # interrupt points per operation in the suite
_EXIT_FIRST_LINE = scoped_hooks.__exit__.__code__.co_firstlineno + 1


def _half(x, hook):
    return x * 0.5


def _operations(model, kv):
    hooks = [("blocks.0.hook_resid_post", _half), ("blocks.1.attn.hook_pattern", lambda x, h: None)]
    return {
        "run_with_cache": lambda: model.run_with_cache(TOKENS, fwd_hooks=hooks, names_filter=lambda n: "resid" in n),
        "hooks_block": lambda: _in_block(model, hooks),
        "kv_forward": lambda: model.run_with_hooks(TOKENS[:, 3:], past_kv=kv, fwd_hooks=hooks),
        "generate": lambda: model.generate(TOKENS, max_new_tokens=2, stop_at_eos=False, fwd_hooks=hooks),
        "stream": lambda: list(model.generate_stream(TOKENS, max_new_tokens=2, max_tokens_per_yield=1,
                                                     stop_at_eos=False, fwd_hooks=hooks)),
        "sweep": lambda: patch_layer_position(model, TOKENS[:1], TOKENS[1:], layers=[1], positions=[3, 4],
                                              progress=False),
    }


def _in_block(model, hooks):
    with model.hooks(fwd_hooks=hooks):
        model(TOKENS)


class _InterruptAt:
    """A tracer raising KeyboardInterrupt at the k-th line executed in hookedcot's files."""

    def __init__(self, k: int):
        self.k, self.count, self.at = k, 0, None

    def __call__(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.k:
                self.at = (frame.f_code.co_name, frame.f_lineno)
                raise KeyboardInterrupt
        return self._line


def _run(fn, k: int) -> tuple[_InterruptAt, bool]:
    """-> (the tracer: lines counted, where it raised; whether the interrupt propagated out of the call)."""
    tracer = _InterruptAt(k)
    sys.settrace(tracer)
    try:
        fn()
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(None)
    return tracer, interrupted


@pytest.fixture(scope="module")
def world():
    model = random_model(CFG, seed=11)
    model.add_perma_hook("blocks.1.hook_mlp_out", _half)  # a persistent hook that must survive every interrupt
    kv = KVCache(CFG, 2, 5, model.dtype, "cpu")
    with torch.no_grad():
        model(TOKENS[:, :3], past_kv=kv)
        reference = model(TOKENS)
    return model, kv, reference


def _interrupt_everywhere(world, name: str, samples: int | None) -> int:
    model, kv, reference = world
    fn = _operations(model, kv)[name]
    fn()  # warm-up: a first call runs lines later ones do not (lazy imports, notices shown once)
    kv.truncate(3)
    tracer, interrupted = _run(fn, k=0)
    total = tracer.count
    assert not interrupted and total > 100
    kv.truncate(3)
    points = range(1, total + 1)
    if samples is not None:
        points = sorted({1 + (i * total) // samples for i in range(samples)})
    hit = 0
    for k in points:
        grad = torch.is_grad_enabled()
        tracer, interrupted = _run(fn, k)
        if tracer.at is None:  # this call ran fewer lines than the counted one (a decode loop stopping early)
            kv.truncate(3)
            continue
        hit += 1
        assert interrupted, f"{name}: the interrupt at line event {k} of {total} ({tracer.at}) did not propagate"
        where = f"{name}, interrupted at line event {k} of {total}"
        if _SCOPED.get() and name == "hooks_block" and tracer.at == ("__exit__", _EXIT_FIRST_LINE):
            # the one line Python cannot protect: an interrupt before a with-block's __exit__ runs
            # its first statement (documented); reset_hooks() clears what it left
            model.reset_hooks()
        assert _SCOPED.get() == (), f"{where}: scoped hooks left attached"
        assert model.active_hook_names() == ["blocks.1.hook_mlp_out"], where
        assert torch.is_grad_enabled() == grad and not torch.is_inference_mode_enabled(), where
        # as it was, or extended by a forward that had completed when the interrupt came (valid entries)
        assert kv.length in (3, 5), f"{where}: the KV cache moved to {kv.length}"
        kv.truncate(3)
        with torch.no_grad():
            assert torch.equal(model(TOKENS), reference), f"{where}: the next call's logits differ"
    return hit


OPERATIONS = ("run_with_cache", "hooks_block", "kv_forward", "generate", "stream", "sweep")


@pytest.mark.parametrize("name", OPERATIONS)
def test_an_interrupt_at_sampled_lines_leaves_nothing_behind(world, name):
    assert _interrupt_everywhere(world, name, CI_SAMPLES) >= CI_SAMPLES * 0.9


@pytest.mark.slow
@pytest.mark.parametrize("name", OPERATIONS)
def test_an_interrupt_at_every_line_leaves_nothing_behind(world, name):
    _interrupt_everywhere(world, name, None)
