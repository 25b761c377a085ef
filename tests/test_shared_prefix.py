"""SharedPrefixKVCache: rows continuing one prefix held once. Decode steps through it equal the
same steps through an ordinary KVCache holding a copy of the prefix per row, and full forwards of
the whole sequences without any cache; across the GQA quirks and on SmolLM2; with one new token
and several; with hooks on the pattern; after rows are dropped."""

from __future__ import annotations

import pytest
import torch

from hookedcot import HookedCoT
from hookedcot.kv_cache import KVCache, SharedPrefixKVCache

ROWS = 3
ATOL = 3e-5  # logits up to ~55 here: the cached and the full forward, or SDPA and the explicit path, differ by 1.4e-5


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoints):
    return {name: HookedCoT.from_pretrained(folder) for name, folder in tiny_checkpoints.items()}


def prefix_and_steps(model, prefix_len=9, steps=(1, 1, 3, 1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    prefix = torch.randint(0, vocab, (1, prefix_len), generator=gen)
    return prefix, [torch.randint(0, vocab, (ROWS, n), generator=gen) for n in steps]


def shared_cache(model, prefix, max_new):
    prefix_cache = KVCache(model.cfg, 1, prefix.shape[1], model.dtype, "cpu")
    model(prefix, past_kv=prefix_cache)
    return SharedPrefixKVCache(prefix_cache, ROWS, max_new)


def expanded_cache(model, prefix, max_new):
    """The ordinary way: the prefix run once per row into a cache with room for the new positions."""
    cache = KVCache(model.cfg, ROWS, prefix.shape[1] + max_new, model.dtype, "cpu")
    model(prefix.expand(ROWS, -1), past_kv=cache)
    return cache


def full_forward_logits(model, prefix, steps):
    """Logits of each step's positions from one forward of the whole sequences, no cache."""
    whole = torch.cat([prefix.expand(ROWS, -1), *steps], dim=1)
    logits = model(whole)
    out, at = [], prefix.shape[1]
    for step in steps:
        out.append(logits[:, at : at + step.shape[1]])
        at += step.shape[1]
    return out


def decode(model, cache, steps):
    return [model(step, past_kv=cache) for step in steps]


@pytest.mark.parametrize("name", ["qwen2", "llama32", "smollm2_like", "r1_distill_qwen"])
def test_decode_steps_through_a_shared_prefix_equal_an_expanded_cache_and_full_forwards(tiny_models, name):
    model = tiny_models[name]
    prefix, steps = prefix_and_steps(model)
    max_new = sum(s.shape[1] for s in steps)
    shared = decode(model, shared_cache(model, prefix, max_new), steps)
    expanded = decode(model, expanded_cache(model, prefix, max_new), steps)
    full = full_forward_logits(model, prefix, steps)
    for got, ref, whole in zip(shared, expanded, full):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got, whole, atol=ATOL, rtol=1e-5)


def test_smollm2_decode_through_a_shared_prefix_equals_an_expanded_cache(smol_model):
    prefix, steps = prefix_and_steps(smol_model, prefix_len=40, steps=(1, 2, 1))
    shared = decode(smol_model, shared_cache(smol_model, prefix, 4), steps)
    expanded = decode(smol_model, expanded_cache(smol_model, prefix, 4), steps)
    full = full_forward_logits(smol_model, prefix, steps)
    for got, ref, whole in zip(shared, expanded, full):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got, whole, atol=1e-4, rtol=1e-5)


def test_hooks_on_the_pattern_and_scores_see_what_the_ordinary_cache_shows(tiny_models):
    model = tiny_models["llama32"]
    prefix, steps = prefix_and_steps(model, steps=(1, 2))
    seen: dict[str, list[torch.Tensor]] = {"shared": [], "expanded": []}

    def runs(kind, cache):
        record = lambda t, hook: seen[kind].append(t.clone())  # noqa: E731
        hooks = [("blocks.1.attn.hook_pattern", record), ("blocks.0.attn.hook_attn_scores", record)]
        return [model.run_with_hooks(step, past_kv=cache, fwd_hooks=hooks) for step in steps]

    shared = runs("shared", shared_cache(model, prefix, 3))
    expanded = runs("expanded", expanded_cache(model, prefix, 3))
    assert len(seen["shared"]) == len(seen["expanded"]) == 4
    for got, ref in zip(seen["shared"] + shared, seen["expanded"] + expanded):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-5)


def test_a_hook_on_the_pattern_changes_the_output_as_with_the_ordinary_cache(tiny_models):
    model = tiny_models["smollm2_like"]
    prefix, steps = prefix_and_steps(model, steps=(1,))

    def first_key_only(pattern, hook):
        out = torch.zeros_like(pattern)
        out[..., 0] = 1
        return out

    hooks = [("blocks.0.attn.hook_pattern", first_key_only)]
    got = model.run_with_hooks(steps[0], past_kv=shared_cache(model, prefix, 1), fwd_hooks=hooks)
    ref = model.run_with_hooks(steps[0], past_kv=expanded_cache(model, prefix, 1), fwd_hooks=hooks)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-5)


def test_rows_kept_by_select_rows_decode_as_they_would_have(tiny_models):
    model = tiny_models["qwen2"]
    prefix, steps = prefix_and_steps(model, steps=(1, 2, 1))
    cache = shared_cache(model, prefix, 4)
    model(steps[0], past_kv=cache)
    keep = torch.tensor([2, 0])
    narrowed = cache.select_rows(keep)
    got = [model(s[keep], past_kv=narrowed) for s in steps[1:]]
    full = full_forward_logits(model, prefix, steps)
    for g, whole in zip(got, full[1:]):
        torch.testing.assert_close(g, whole[keep], atol=ATOL, rtol=1e-5)


def test_padding_is_refused_and_overflow_is_explained(tiny_models):
    model = tiny_models["qwen2"]
    prefix, steps = prefix_and_steps(model, steps=(1,))
    cache = shared_cache(model, prefix, 1)
    mask = torch.ones(ROWS, prefix.shape[1] + 1, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="no padding"):
        model(steps[0], past_kv=cache, attention_mask=mask)
    cache = shared_cache(model, prefix, 1)
    model(steps[0], past_kv=cache)
    with pytest.raises(ValueError, match="max_new"):
        model(steps[0], past_kv=cache)


def test_a_shared_prefix_is_one_row(tiny_models):
    model = tiny_models["qwen2"]
    two = KVCache(model.cfg, 2, 4, model.dtype, "cpu")
    with pytest.raises(ValueError, match="one row"):
        SharedPrefixKVCache(two, ROWS, 1)
