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
    again_logits, again = run_with_cache_compiled(model, other)  # same shape: the same graph
    assert len(GRAPH_COMPILE_SECONDS) == before + 1
    torch.testing.assert_close(again["blocks.2.hook_resid_post"], model.run_with_cache(other)[1]["blocks.2.hook_resid_post"],
                               rtol=1e-4, atol=1e-4)


def test_what_the_graph_cannot_run_is_refused_with_the_way_out(model):
    tokens = torch.randint(0, 130, (1, 5))
    with model.hooks([add_vector("blocks.0.hook_resid_post", torch.ones(32), 1.0)]):
        with pytest.raises(ValueError, match="is active, and a compiled cache would not run it"):
            run_with_cache_compiled(model, tokens)
    with pytest.raises(ValueError, match="token ids"):
        run_with_cache_compiled(model, torch.randn(1, 5, 32))
    with pytest.raises(HookNameError, match="closest valid names are: blocks.0.hook_resid_post"):
        run_with_cache_compiled(model, tokens, names_filter=["blocks.0.hook_resid_pots"])
