"""The hook contract on a random-weight model: names, shapes, firing, edits, scoping, errors."""

from __future__ import annotations

import threading

import pytest
import torch
from model_factory import random_model

from hookedcot import HOOKS, HookedCoT, HookError, HookNameError, ModelConfig, get_act_name
from hookedcot.hook_names import spec_of
from hookedcot.hook_points import _SCOPED

CFG = ModelConfig(
    n_layers=3, d_model=48, n_heads=6, n_key_value_heads=2, d_head=12, d_mlp=96, d_vocab=211,
    qkv_bias=True, rope_theta=1e4, norm_eps=1e-6,
)


@pytest.fixture(scope="module")
def model() -> HookedCoT:
    return random_model(CFG)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, CFG.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def expected_shape(spec_shape: str, b: int, p: int) -> tuple[int, ...]:
    sizes = {"b": b, "p": p, "q": p, "s": p, "d": CFG.d_model, "h": CFG.n_heads, "g": CFG.n_key_value_heads,
             "k": CFG.d_head, "m": CFG.d_mlp, "v": CFG.d_vocab, "1": 1}
    return tuple(sizes[c] for c in spec_shape.split())


def test_every_hook_fires_once_with_its_documented_shape(model, tokens):
    seen: dict[str, list[tuple[int, ...]]] = {}

    def record(x, hook):
        seen.setdefault(hook.name, []).append(tuple(x.shape))

    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, record)])
    assert list(seen) == model.hook_names()  # every hook, in firing order
    per_layer = [s for s in HOOKS if s.per_layer]
    assert len(model.hook_names()) == 1 + CFG.n_layers * len(per_layer) + 4  # final norm (2), unembed (2)
    for name, shapes in seen.items():
        assert shapes == [expected_shape(spec_of(name).shape, *tokens.shape)], name


def test_no_hooks_left_after_run_with_hooks(model, tokens):
    baseline = model(tokens)
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, h: x * 0)])
    assert _SCOPED.get() == ()
    torch.testing.assert_close(model(tokens), baseline, rtol=0, atol=0)


def test_unknown_hook_name_lists_the_closest(model, tokens):
    with pytest.raises(HookNameError) as err:
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pots", lambda x, h: None)])
    assert "blocks.1.hook_resid_post" in str(err.value) and "closest" in str(err.value)
    with pytest.raises(HookNameError, match="blocks.1.attn.hook_q"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_qq", lambda x, h: None)])


def test_bad_names_attach_nothing(model, tokens):
    with pytest.raises(HookNameError):
        model.add_hook("blocks.9.hook_resid_post", lambda x, h: x * 0)
    assert model._persistent == {}


def test_wrong_replacement_shape_names_the_hook_and_shapes_and_leaves_nothing(model, tokens):
    baseline = model(tokens)
    with pytest.raises(HookError) as err:
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", lambda x, h: x[..., :5])])
    msg = str(err.value)
    assert "blocks.1.mlp.hook_post" in msg and "(2, 9, 5)" in msg and "(2, 9, 96)" in msg
    with pytest.raises(HookError, match="dtype"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, h: x.double())])
    assert _SCOPED.get() == ()
    torch.testing.assert_close(model(tokens), baseline, rtol=0, atol=0)


def test_hooks_context_removed_on_exception(model, tokens):
    baseline = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, h: x * 0)]):
            assert not torch.equal(model(tokens), baseline)
            raise RuntimeError("boom")
    torch.testing.assert_close(model(tokens), baseline, rtol=0, atol=0)


def test_scoped_hooks_are_invisible_to_other_threads(model, tokens):
    baseline = model(tokens)
    inside, done = threading.Event(), threading.Event()
    result = {}

    def other_thread():
        inside.wait()
        result["logits"] = model(tokens)
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, h: x * 0)]):
        inside.set()
        done.wait(timeout=60)
        hooked = model(tokens)
    t.join()
    torch.testing.assert_close(result["logits"], baseline, rtol=0, atol=0)
    assert not torch.allclose(hooked, baseline)


def test_scoped_hooks_belong_to_the_model_that_installed_them(model, tokens):
    """A second model run inside another's hook block (a diffing partner, a patch source) sees none of them."""
    other = random_model(CFG, seed=5)
    baseline, fired = other(tokens), []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, h: fired.append(1) or x * 0)]):
        torch.testing.assert_close(other(tokens), baseline, rtol=0, atol=0)
        assert not fired and other.active_hook_names() == []
        model(tokens)
    assert fired == [1]


def test_persistent_hooks_until_reset(model, tokens):
    baseline = model(tokens)
    model.add_hook("blocks.2.hook_mlp_out", lambda x, h: x * 0)
    try:
        assert not torch.allclose(model(tokens), baseline)
    finally:
        model.reset_hooks()
    torch.testing.assert_close(model(tokens), baseline, rtol=0, atol=0)


def test_sdpa_path_equals_explicit_path(model, tokens):
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        fused = model(tokens, **kwargs)
        explicit = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, h: None)], **kwargs)
        valid = kwargs.get("attention_mask", torch.ones_like(tokens)).bool()
        torch.testing.assert_close(explicit[valid], fused[valid], rtol=1e-5, atol=1e-5)


def test_zeroing_a_head_in_hook_z_equals_zeroing_its_output_weights(model, tokens):
    layer, head = 1, 4
    k = CFG.d_head

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    hooked = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("z", layer), zero_head)])
    w = model.blocks[layer].attn.o_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[:, head * k : (head + 1) * k] = 0
    try:
        by_hand = model(tokens)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    torch.testing.assert_close(hooked, by_hand, rtol=1e-6, atol=1e-6)


def test_hook_result_sums_to_attn_out(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_result", "hook_attn_out")))
    for layer in range(CFG.n_layers):
        torch.testing.assert_close(cache["result", layer].sum(2), cache["attn_out", layer], rtol=1e-5, atol=1e-5)


def test_start_and_stop_at_layer(model, tokens):
    full, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre"))
    for layer in range(CFG.n_layers):
        resid = cache["resid_pre", layer]
        torch.testing.assert_close(model(resid, start_at_layer=layer), full, rtol=0, atol=0)
        torch.testing.assert_close(model(tokens, stop_at_layer=layer), resid, rtol=0, atol=0)


def test_inputs_embeds_equal_tokens(model, tokens):
    embeds = model.W_E[tokens]
    torch.testing.assert_close(model(inputs_embeds=embeds), model(tokens), rtol=0, atol=0)


def test_padded_row_equals_row_alone(model):
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, CFG.d_vocab, (1, 10), generator=g)
    b = torch.randint(0, CFG.d_vocab, (1, 6), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model(batch, attention_mask=mask)
    torch.testing.assert_close(out[0], model(a)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 4:], model(b)[0], rtol=1e-5, atol=1e-5)
    # Changing what sits under the padding changes nothing real.
    batch2 = batch.clone()
    batch2[1, :4] = 7
    torch.testing.assert_close(model(batch2, attention_mask=mask)[1, 4:], out[1, 4:], rtol=0, atol=0)


def test_cache_helpers(model, tokens):
    logits, cache = model.run_with_cache(tokens)
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]
    assert cache.stack_activation("resid_post").shape == (CFG.n_layers, *tokens.shape, CFG.d_model)
    lens = cache.accumulated_resid(apply_ln=True)
    assert lens.shape[0] == CFG.n_layers + 1
    torch.testing.assert_close(model.unembed(lens[-1]), logits, rtol=0, atol=0)
    parts = cache.decompose_resid()
    torch.testing.assert_close(parts.sum(0), cache["resid_post", CFG.n_layers - 1], rtol=1e-5, atol=1e-5)
    normed = cache.apply_ln_to_stack(parts).sum(0)
    torch.testing.assert_close(normed, cache["ln_final.hook_normalized"], rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="names_filter"):
        model.run_with_cache(tokens, names_filter="hook_embed")[1]["resid_post", 0]


def test_loss_matches_manual(model, tokens):
    logits, loss = model(tokens, return_type="both")
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, CFG.d_vocab), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual, rtol=1e-6, atol=1e-6)


def test_get_act_name():
    assert get_act_name("resid_pre", 3) == "blocks.3.hook_resid_pre"
    assert get_act_name("post", 2) == "blocks.2.mlp.hook_post"
    assert get_act_name("scale", 1, "ln2") == "blocks.1.ln2.hook_scale"
    assert get_act_name("normalized") == "ln_final.hook_normalized"
    with pytest.raises(KeyError, match="resid_post"):
        get_act_name("resid_pots", 1)


def test_input_errors(model, tokens):
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[CFG.d_vocab]]))
    with pytest.raises(TypeError, match="inputs_embeds"):
        model(torch.randn(1, 3, CFG.d_model))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(tokens, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="no tokenizer"):
        model("text without a tokenizer")
    with pytest.raises(ValueError, match="out of range"):
        model(tokens, stop_at_layer=7)


def test_generation_hooks_see_new_positions_and_cached_equals_uncached(model):
    prompt = torch.randint(0, CFG.d_vocab, (2, 5), generator=torch.Generator().manual_seed(2))
    seen = []
    out = model.generate(prompt, 4, stop_at_eos=False,
                         fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, h: seen.append(h.positions.tolist()))])
    assert seen == [[0, 1, 2, 3, 4], [5], [6], [7]]
    assert torch.equal(out, model.generate(prompt, 4, stop_at_eos=False, use_cache=False))
    assert _SCOPED.get() == ()


def test_steering_during_generation_from_a_position(model):
    prompt = torch.randint(0, CFG.d_vocab, (1, 5), generator=torch.Generator().manual_seed(3))
    base = model.generate(prompt, 6, stop_at_eos=False)
    v = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(4)) * 20

    def steer(scale):
        def fn(x, hook):
            return x + scale * v * (hook.positions >= 6)[None, :, None]
        return fn

    assert torch.equal(model.generate(prompt, 6, stop_at_eos=False, fwd_hooks=[("blocks.1.hook_resid_post", steer(0.0))]), base)
    steered = model.generate(prompt, 6, stop_at_eos=False, fwd_hooks=[("blocks.1.hook_resid_post", steer(1.0))])
    assert torch.equal(steered[:, :7], base[:, :7]) and not torch.equal(steered, base)


def test_active_hook_names_sees_persistent_and_scoped_hooks(model):
    a, b = "blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"
    assert model.active_hook_names() == []
    model.add_hook(a, lambda x, h: None)
    try:
        with model.hooks([(b, lambda x, h: None)]):
            assert model.active_hook_names() == sorted([a, b])
        assert model.active_hook_names() == [a]
    finally:
        model.reset_hooks()
    assert model.active_hook_names() == []
