"""The fast decode path: a static KV cache equals the dynamic one; greedy tokens on the fast path
equal the eager loop's (the embedded SmolLM2, 64 tokens, a steering vector on, float32 and
bfloat16); a Python hook sends generation to the eager loop and says which; seeded sampling on the
fast path repeats; "auto" compiles by its documented rule and falls back when a compile fails.

Tolerances. The static step that is not compiled attends over exactly the slots written so far,
so its logits equal the eager loop's bit for bit (float32 and bfloat16). The compiled step attends
over the whole capacity (fixed shapes) and sums each product in inductor's order, not MKL's: its
float32 logits agree with the eager loop's to 1e-4 absolute (the size of transformers'
sdpa-vs-eager gap on the real model); in bfloat16 its greedy tokens may part from the eager loop's
only where the eager loop's own top two logits are within bfloat16 rounding of each other."""

from __future__ import annotations

import warnings

import pytest
import torch
from model_factory import random_model

from hookedcot import ModelConfig
from hookedcot import fast_decode
from hookedcot.fast_decode import AUTO_COMPILE_MIN_NEW_TOKENS, COMPILE_SECONDS, FastPathNotice, auto_compiles, bucket
from hookedcot.interp.interventions import AddVector, Record
from hookedcot.interp.steering import add_vector
from hookedcot.kv_cache import KVCache, StaticKVCache

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=130,
                  qkv_bias=True, norm_eps=1e-6)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=5)


def padded_prompt(batch=3, pos=7, seed=2):
    tokens = torch.randint(0, 130, (batch, pos), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return tokens, mask


def test_static_cache_logits_equal_the_dynamic_caches_on_a_padded_batch(model):
    tokens, mask = padded_prompt()
    nxt = torch.randint(0, 130, (3, 4), generator=torch.Generator().manual_seed(3))
    dynamic, static = _outs(model, tokens, mask, nxt, KVCache), _outs(model, tokens, mask, nxt, StaticKVCache)
    for a, b in zip(dynamic, static):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    real = mask_full(mask, 4).bool()
    with torch.no_grad():
        no_cache = model(torch.cat([tokens, nxt], 1), attention_mask=mask_full(mask, 4))
    torch.testing.assert_close(torch.cat(static, 1)[real], no_cache[real], rtol=0, atol=1e-5)


def mask_full(mask, n):
    return torch.cat([mask, torch.ones(mask.shape[0], n, dtype=mask.dtype)], 1)


def _outs(model, tokens, mask, nxt, cls):
    cache = cls(CFG, tokens.shape[0], 16, torch.float32, "cpu")
    with torch.no_grad():
        outs = [model(tokens, attention_mask=mask, past_kv=cache)]
        for i in range(nxt.shape[1]):
            outs.append(model(nxt[:, i : i + 1], attention_mask=mask_full(mask, i + 1), past_kv=cache))
    return outs


def test_fast_path_greedy_tokens_equal_the_eager_loops_on_a_padded_batch_with_early_stops(model):
    tokens, mask = padded_prompt()
    steer = AddVector(torch.randn(32, generator=torch.Generator().manual_seed(6)), 2.0, positions="from 8")
    kw = dict(attention_mask=mask, fwd_hooks=[("blocks.1.hook_resid_post", steer)], output_logits=True,
              eos_token_id=[5, 17, 40])
    fast = model.generate(tokens, 20, decode="static", **kw)
    eager = model.generate(tokens, 20, decode="eager", **kw)
    assert torch.equal(fast.sequences, eager.sequences)
    for a, b in zip(fast.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_python_hook_forces_the_eager_loop_and_names_itself(model):
    tokens, mask = padded_prompt()

    def my_python_hook(x, hook):
        return x * 1.0

    with pytest.warns(FastPathNotice, match="my_python_hook.*blocks.1.hook_resid_post"):
        model.generate(tokens, 3, attention_mask=mask, fwd_hooks=[("blocks.1.hook_resid_post", my_python_hook)])
    with pytest.raises(ValueError, match="decode='static' needs .* declarative"):
        model.generate(tokens, 3, attention_mask=mask, decode="static",
                       fwd_hooks=[("blocks.1.hook_resid_post", my_python_hook)])
    model.add_hook("blocks.0.hook_resid_pre", my_python_hook)  # a persistent hook counts too
    try:
        with pytest.warns(FastPathNotice, match="my_python_hook"):
            model.generate(tokens, 3, attention_mask=mask)
    finally:
        model.reset_hooks()
    with warnings.catch_warnings():  # declarative hooks alone: no notice
        warnings.simplefilter("error", FastPathNotice)
        model.generate(tokens, 3, attention_mask=mask, fwd_hooks=[add_vector("blocks.1.hook_resid_post", torch.ones(32))])


def test_seeded_sampling_on_the_fast_path_repeats_and_follows_the_seed(model):
    tokens, mask = padded_prompt()
    kw = dict(attention_mask=mask, do_sample=True, temperature=1.5, top_p=0.95, stop_at_eos=False, decode="static",
              fwd_hooks=[add_vector("blocks.2.hook_resid_mid", torch.ones(32), 0.5)])
    a, b = model.generate(tokens, 16, seed=11, **kw), model.generate(tokens, 16, seed=11, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(tokens, 16, seed=12, **kw))


def test_record_in_a_fast_generation_holds_what_a_forward_over_the_result_sees(model):
    tokens = torch.randint(0, 130, (1, 5), generator=torch.Generator().manual_seed(2))
    name = "blocks.1.hook_resid_post"
    rec = Record.for_hook(model, name, batch=1, capacity=13)
    out = model.generate(tokens, 8, stop_at_eos=False, decode="static", fwd_hooks=[(name, rec)])
    with torch.no_grad():
        _, cache = model.run_with_cache(out[:, :-1].clone(), names_filter=name)  # the last token is never run
    torch.testing.assert_close(rec.buffer[:, :12], cache[name], rtol=1e-4, atol=1e-4)  # float32 reordering


def test_greedy_tokens_on_the_fast_path_equal_the_eager_loops_for_64_tokens_on_smollm2(smol_model):
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1018, 30, 378, 3458, 282, 4649, 314]])
    v = torch.randn(smol_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    steer = add_vector("blocks.15.hook_resid_post", v, 2.0, positions="from 10")
    kw = dict(stop_at_eos=False, fwd_hooks=[steer], output_logits=True)
    fast = smol_model.generate(prompt, 64, decode="static", **kw)
    eager = smol_model.generate(prompt, 64, decode="eager", **kw)
    assert torch.equal(fast.sequences, eager.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fast.logits, eager.logits))  # same ops, same shapes: same bits


def _steered_smollm2_in_bfloat16(smol, decode: str):
    """SmolLM2 in bfloat16, 64 greedy tokens with a steering vector: (on `decode`, on the eager loop)."""
    from hookedcot import HookedCoT
    from hookedcot.loading import build_model

    model = build_model(HookedCoT, smol, torch.bfloat16, torch.device("cpu"))
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1018, 30, 378, 3458, 282, 4649, 314]])
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    kw = dict(stop_at_eos=False, fwd_hooks=[add_vector("blocks.15.hook_resid_post", v, 2.0, positions="from 10")],
              output_logits=True)
    return model.generate(prompt, 64, decode=decode, **kw), model.generate(prompt, 64, decode="eager", **kw)


def test_bfloat16_greedy_tokens_and_logits_on_the_fast_path_equal_the_eager_loops_on_smollm2(smol):
    fast, eager = _steered_smollm2_in_bfloat16(smol, "static")
    assert torch.equal(fast.sequences, eager.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fast.logits, eager.logits))


def _compiled_once_then_eager(model, inputs, n, **kw):
    """(compiled generation, eager generation), checking that the first compiled exactly one new
    step (and said so) and that both chose the same tokens."""
    n_compiled = len(COMPILE_SECONDS)
    with pytest.warns(FastPathNotice, match="compiled the decode step"):
        fast = model.generate(inputs, n, decode="compiled", **kw)
    assert len(COMPILE_SECONDS) == n_compiled + 1
    eager = model.generate(inputs, n, decode="eager", **kw)
    assert torch.equal(fast.sequences, eager.sequences)
    return fast, eager


def test_compiled_step_equals_the_eager_loop_on_a_padded_batch_with_early_stops(model, monkeypatch):
    """One inductor compile of the 3-layer model (~10-15 s on 2 cores). Its products are
    reductions and its attention spans the whole capacity: tokens equal, logits to 1e-4."""
    tokens, mask = padded_prompt()
    steer = AddVector(torch.randn(32, generator=torch.Generator().manual_seed(8)), 1.5, positions="from 6")
    kw = dict(attention_mask=mask, fwd_hooks=[("blocks.2.hook_resid_mid", steer)], output_logits=True,
              eos_token_id=[5, 17, 40])
    n_compiled = len(COMPILE_SECONDS)
    fast, eager = _compiled_once_then_eager(model, tokens, 20, **kw)
    for a, b in zip(fast.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # "auto" takes the compiled step for a key compiled already, however few tokens; a new vector
    # of the same shape is the same key (its values are read from the tensor, not baked in)
    calls = []
    real = fast_decode._compiled
    monkeypatch.setattr(fast_decode, "_compiled", lambda: calls.append(1) or real())
    steer.delta.copy_(torch.randn(32, generator=torch.Generator().manual_seed(9)))
    auto = model.generate(tokens, 20, **kw)
    assert calls and len(COMPILE_SECONDS) == n_compiled + 1
    assert (fast.decode, eager.decode, auto.decode) == ("compiled", "eager", "compiled")
    assert torch.equal(auto.sequences, model.generate(tokens, 20, decode="eager", **kw).sequences)
    # a plain setting the graph bakes in (here the first steered position) is another key: a short
    # "auto" generation then runs the static step rather than a silent recompile
    calls.clear()
    moved = AddVector(steer.delta.clone(), 1.0, positions="from 7")
    other = model.generate(tokens, 20, **{**kw, "fwd_hooks": [("blocks.2.hook_resid_mid", moved)]})
    assert other.decode == "static" and not calls and len(COMPILE_SECONDS) == n_compiled + 1


def test_auto_compiles_long_generations_on_the_cpu_and_buckets_capacity_by_powers_of_two(model):
    assert [bucket(n) for n in (1, 200, 256, 257, 512, 513, 3000)] == [256, 256, 256, 512, 512, 1024, 4096]
    hooks = {"blocks.0.hook_resid_post": [AddVector(torch.ones(32), 1.0)]}
    assert not auto_compiles(model, 1, 900, hooks, AUTO_COMPILE_MIN_NEW_TOKENS - 1)
    assert auto_compiles(model, 1, 900, hooks, AUTO_COMPILE_MIN_NEW_TOKENS)
    assert auto_compiles(model, 4, 900, hooks, AUTO_COMPILE_MIN_NEW_TOKENS)
    assert not auto_compiles(model, 5, 900, hooks, AUTO_COMPILE_MIN_NEW_TOKENS)  # products stay F.linear's


def test_a_compile_that_fails_sends_auto_to_the_static_step_once_and_raises_by_request(model, monkeypatch):
    def broken():
        def step(*args):
            raise RuntimeError("no C++ compiler found")
        return step

    monkeypatch.setattr(fast_decode, "_compiled", broken)
    monkeypatch.setattr(fast_decode, "COMPILE_FAILED", {})
    monkeypatch.setattr(fast_decode, "AUTO_COMPILE_MIN_NEW_TOKENS", 24)  # the rule as it is, on fewer steps
    tokens = torch.randint(0, 130, (1, 5), generator=torch.Generator().manual_seed(4))
    n = fast_decode.AUTO_COMPILE_MIN_NEW_TOKENS
    hooks = [("blocks.0.hook_resid_post", AddVector(torch.ones(32), 0.5))]
    with pytest.warns(FastPathNotice, match="the compiled decode step failed .*no C\\+\\+ compiler"):
        out = model.generate(tokens, n, stop_at_eos=False, fwd_hooks=hooks, output_logits=True)
    assert len(fast_decode.COMPILE_FAILED) == 1 and out.decode == "static"
    out = out.sequences
    assert torch.equal(out, model.generate(tokens, n, stop_at_eos=False, fwd_hooks=hooks, decode="static"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathNotice)  # not tried again
        model.generate(tokens, n, stop_at_eos=False, fwd_hooks=hooks)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        model.generate(tokens, 3, stop_at_eos=False, fwd_hooks=hooks, decode="compiled")


@pytest.mark.slow
def test_compiled_greedy_tokens_equal_the_eager_loops_for_64_tokens_on_smollm2(smol_model):
    """Compiles the decode step with inductor (minutes on 2 shared cores): slow."""
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1018, 30, 378, 3458, 282, 4649, 314]])
    v = torch.randn(smol_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    kw = dict(stop_at_eos=False, fwd_hooks=[add_vector("blocks.15.hook_resid_post", v, 2.0)], output_logits=True)
    n_compiled = len(COMPILE_SECONDS)
    fast, eager = _compiled_once_then_eager(smol_model, prompt, 64, **kw)
    assert max(float((a - b).abs().max()) for a, b in zip(fast.logits, eager.logits)) < 1e-4
    again = smol_model.generate(prompt, 64, decode="compiled", **kw)  # the same key: no new compile
    assert len(COMPILE_SECONDS) == n_compiled + 1 and torch.equal(again.sequences, fast.sequences)


@pytest.mark.slow
def test_bfloat16_compiled_tokens_follow_the_eager_loops_until_a_near_tie_on_smollm2(smol):
    """Compiles SmolLM2 in bfloat16 (~25 s): tokens equal the eager loop's up to the first step
    where the eager loop's own top two logits are within 4 bfloat16 ulps of each other."""
    fast, eager = _steered_smollm2_in_bfloat16(smol, "compiled")
    parted = (fast.sequences[0] != eager.sequences[0]).nonzero()
    if len(parted):
        step = int(parted[0]) - 13  # the prompt's length
        top = eager.logits[step][0].float().topk(2).values
        ulp = 2.0 ** (torch.floor(torch.log2(top[0].abs())) - 7)
        assert float(top[0] - top[1]) <= 4 * float(ulp), f"parted at step {step} without a near tie"
