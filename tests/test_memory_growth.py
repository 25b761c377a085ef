"""Memory stays flat over long runs: resident memory after many `run_with_cache`, `generate` and
sweep calls in one process grows < 1 % after warm-up; cached tensors are detached unless
gradients are asked for; no reference cycle keeps a cache (or a forward's graph) alive.

The growth is measured in a fresh interpreter (`CHILD`), so the suite's other tests and their
allocations do not count. The quick version (100 / 10 / 10 calls) runs in the suite; the long one
(1,000 / 100 / 100, the issue's numbers) is marked slow. Both print the measured figures
(`pytest -s` shows them)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch
from model_factory import random_model

from hookedcot import ModelConfig
from hookedcot.kv_cache import KVCache

CHILD = r"""
import gc, json, sys
import torch
from hookedcot import HookedCoT, ModelConfig
from hookedcot.interp import patch_layer_position

n_cache, n_generate, n_sweep = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = ModelConfig(n_layers=4, d_model=128, n_heads=4, n_key_value_heads=2, d_head=32, d_mlp=256, d_vocab=512)
model = HookedCoT(cfg).eval()
tokens = torch.randint(0, cfg.d_vocab, (2, 48))
clean, corrupt = tokens[:1], tokens[1:]

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def run_cache(i):
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, h: x * 1.01)])
        cache.accumulated_resid(layer=-1, apply_ln=True)
        cache.decompose_resid(layer=2)

def run_generate(i):
    model.generate(tokens, max_new_tokens=8, stop_at_eos=False, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, h: None)])

def run_sweep(i):
    patch_layer_position(model, clean, corrupt, layers=[0, 2], positions=list(range(40, 48)), progress=False)

figures = {}
for name, fn, n in (("run_with_cache", run_cache, n_cache), ("generate", run_generate, n_generate),
                    ("sweep", run_sweep, n_sweep)):
    for i in range(max(10, n // 10)):  # warm-up: allocator pools, lazy imports, first-call caches
        fn(i)
    gc.collect()
    before = rss()
    peak = before
    for i in range(n):
        fn(i)
        peak = max(peak, rss())
    gc.collect()
    after = rss()
    figures[name] = {"calls": n, "rss_before_mib": before / 2**20, "rss_after_mib": after / 2**20,
                     "growth_pct": 100 * (after - before) / before, "peak_growth_pct": 100 * (peak - before) / before}
print(json.dumps(figures))
"""


def _growth(n_cache: int, n_generate: int, n_sweep: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n_cache), str(n_generate), str(n_sweep)],
                         capture_output=True, text=True, check=True, timeout=1800)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(figures, indent=1))
    return figures


def _check(figures: dict) -> None:
    for name, f in figures.items():
        assert f["growth_pct"] < 1.0, f"{name}: resident memory grew {f['growth_pct']:.2f} % over {f['calls']} calls: {f}"


def test_resident_memory_stays_flat_over_a_hundred_calls():
    _check(_growth(100, 10, 10))


@pytest.mark.slow
def test_resident_memory_stays_flat_over_a_thousand_calls():
    _check(_growth(1000, 100, 100))


CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=96)
TOKENS = torch.randint(0, CFG.d_vocab, (2, 7), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=4)


@pytest.fixture
def no_gc():
    """Reference counting alone must free everything: a reference cycle would show as a leak."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_cached_tensors_are_detached_unless_gradients_are_asked_for(model):
    with torch.enable_grad():
        logits, cache = model.run_with_cache(TOKENS)
        assert logits.requires_grad  # the weights require grad, so the output is in a graph
        assert all(t.grad_fn is None and not t.requires_grad for t in cache.values())
        _, attached = model.run_with_cache(TOKENS, detach=False)
        assert all(t.requires_grad for t in attached.values())
        loss, with_grads = model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True)
    grads = [k for k in with_grads.keys() if k.endswith("_grad")]
    assert grads and all(with_grads[k].grad_fn is None for k in grads)
    model.zero_grad(set_to_none=True)


def test_no_reference_cycle_keeps_a_cache_alive(model, no_gc):
    refs = []
    for i in range(100):
        with torch.set_grad_enabled(i % 2 == 0):
            logits, cache = model.run_with_cache(TOKENS, detach=i % 4 != 0)
            cache.accumulated_resid(apply_ln=True)
            cache.decompose_resid()
            cache.stack_head_results(layer=-1)
        refs += [weakref.ref(t) for t in cache.values()] + [weakref.ref(cache), weakref.ref(logits)]
        del logits, cache
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} cached tensors / caches outlived their last reference"


def test_a_forward_with_gradients_over_a_kv_cache_frees_its_graph_and_can_backpropagate(model, no_gc):
    """Writing grad-tracking keys into the cache's buffers in place used to close a reference cycle
    through the views attention saves: every activation of the call stayed alive for good, and
    backward failed (the next layer's write changed what attention had saved)."""
    kv = KVCache(CFG, 2, 7, model.dtype, "cpu")
    seen = []
    watch = [(lambda n: True, lambda x, h: seen.append(weakref.ref(x)))]
    with torch.no_grad():
        model(TOKENS[:, :4], past_kv=kv)
        reference = model.run_with_hooks(TOKENS[:, 4:], past_kv=kv, fwd_hooks=watch)
        kv.truncate(4)
    with torch.enable_grad():
        logits = model.run_with_hooks(TOKENS[:, 4:], past_kv=kv, fwd_hooks=watch)
        logits.sum().backward()
    assert torch.equal(logits.detach(), reference)
    assert model.blocks[0].attn.k_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    assert kv.length == 7 and kv.keys.grad_fn is None  # the cache holds values, not a graph
    del logits, reference
    assert not [r for r in seen if r() is not None]


def test_a_failed_run_with_cache_keeps_no_cached_tensor_in_its_traceback(model):
    """A notebook keeps the last exception (and its frames) alive: the partial cache must not be in them."""

    def fail(x, hook):
        raise KeyboardInterrupt

    try:
        model.run_with_cache(TOKENS, fwd_hooks=[("ln_final.hook_normalized", fail)])
    except KeyboardInterrupt as e:
        kept = e
    frames = [frame for frame, _ in __import__("traceback").walk_tb(kept.__traceback__)]
    held = [name for frame in frames for name, value in frame.f_locals.items()
            if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values())
            and any(str(k).startswith(("hook_embed", "blocks.")) for k in value)]
    assert any(f.f_code.co_name == "run_with_cache" for f in frames)
    assert held == [], f"the traceback holds cached activations in {held}"
