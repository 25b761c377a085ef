"""`run_with_cache_compiled`: the full cache as one compiled graph equals `run_with_cache` (the
hook path) on a tiny model: the same names in the same order, values within float32 rounding
(inductor fuses and reorders ops: 1e-4 absolute and relative), one compile per shape; what it
cannot run is refused with the way out. One compile of a 3-layer model (~10 s on 2 cores)."""

from __future__ import annotations

import pytest
import torch
from model_factory import random_model

from hookedcot import ModelConfig
from hookedcot.fast_decode import FastPathNotice
from hookedcot.graph_cache import GRAPH_COMPILE_SECONDS, run_with_cache_compiled
from hookedcot.hook_points import HookNameError
from hookedcot.inputs import InputError
from hookedcot.interp.steering import add_vector

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=130,
                  qkv_bias=True, norm_eps=1e-6)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=5)


def test_the_compiled_full_cache_equals_run_with_cache_and_compiles_once(model):
    tokens = torch.randint(0, 130, (2, 7), generator=torch.Generator().manual_seed(2))
    before = len(GRAPH_COMPILE_SECONDS)
    with pytest.warns(FastPathNotice, match="compiled a cached forward"):
        logits, cache = model.run_with_cache_compiled(tokens)
    ref_logits, ref = model.run_with_cache(tokens)
    assert list(cache.keys()) == list(ref.keys()) and len(ref.keys()) > 60  # every hook point, patterns included
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name in ref.keys():
        torch.testing.assert_close(cache[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)
    other = torch.randint(0, 130, (2, 7), generator=torch.Generator().manual_seed(3))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again_logits, again = run_with_cache_compiled(model, other)  # same shape: the same graph, not a recompile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert len(GRAPH_COMPILE_SECONDS) == before + 1
    assert not again["blocks.0.hook_resid_post"].is_inference()  # usable in autograd later, as run_with_cache's
    torch.testing.assert_close(again["blocks.2.hook_resid_post"], model.run_with_cache(other)[1]["blocks.2.hook_resid_post"],
                               rtol=1e-4, atol=1e-4)


def test_opt_in_hooks_that_change_the_computation_are_recorded_as_run_with_cache_records_them(model):
    """hook_result (per-head outputs), the split q/k/v inputs and hook_mlp_in change the code path."""
    names = ["blocks.1.attn.hook_result", "blocks.1.hook_q_input", "blocks.1.hook_v_input", "blocks.2.hook_mlp_in",
             "blocks.2.ln2.hook_scale", "blocks.0.attn.hook_pattern"]
    tokens = torch.randint(0, 130, (1, 6), generator=torch.Generator().manual_seed(4))
    logits, cache = run_with_cache_compiled(model, tokens, names_filter=names)
    ref_logits, ref = model.run_with_cache(tokens, names_filter=names)
    assert sorted(cache.keys()) == sorted(ref.keys()) == sorted(names)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name in names:
        torch.testing.assert_close(cache[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)


def test_what_the_graph_cannot_run_is_refused_with_the_way_out(model):
    tokens = torch.randint(0, 130, (1, 5))
    with model.hooks([add_vector("blocks.0.hook_resid_post", torch.ones(32), 1.0)]):
        with pytest.raises(ValueError, match="is active, and a compiled cache would not run it"):
            run_with_cache_compiled(model, tokens)
    with pytest.raises(ValueError, match="token ids"):
        run_with_cache_compiled(model, torch.randn(1, 5, 32))
    with pytest.raises(HookNameError, match="closest valid names are: blocks.0.hook_resid_post"):
        run_with_cache_compiled(model, tokens, names_filter=["blocks.0.hook_resid_pots"])
    with pytest.raises(InputError, match="vocab|130"):  # checked before any graph: inside one it is no clear error
        run_with_cache_compiled(model, torch.tensor([[1, 2, 130]]))
    with pytest.raises(InputError):
        run_with_cache_compiled(model, torch.zeros(1, CFG.n_ctx + 1, dtype=torch.long))


def test_a_compile_that_fails_runs_run_with_cache_and_says_so(model, monkeypatch):
    from hookedcot import graph_cache

    def broken():
        def forward(*args):
            raise RuntimeError("FailOnRecompileLimitHit: Hard failure due to fullgraph=True")
        return forward

    monkeypatch.setattr(graph_cache, "_compiled", broken)
    tokens = torch.randint(0, 130, (1, 5), generator=torch.Generator().manual_seed(6))
    with pytest.warns(FastPathNotice, match="the compiled cached forward failed .*FailOnRecompileLimitHit"):
        logits, cache = run_with_cache_compiled(model, tokens, names_filter=lambda n: "resid_post" in n)
    ref_logits, ref = model.run_with_cache(tokens, names_filter=lambda n: "resid_post" in n)
    assert torch.equal(logits, ref_logits) and list(cache.keys()) == list(ref.keys())
