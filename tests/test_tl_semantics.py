"""TransformerLens' semantics where hookedcot shares its names (issue 14): cache helpers, cache keys,
reset_hooks, gradients, TL's config fields and loading options. Every oracle is built by hand from
the raw cached tensors (`cache.cache_dict`) or a hand-written RMSNorm, never by the helper tested."""

from __future__ import annotations

import warnings

import pytest
import torch
from model_factory import random_model

from hookedcot import HookedCoT, ModelConfig

CFG = ModelConfig(
    n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=97,
    qkv_bias=True, rope_theta=1e4, norm_eps=1e-6,
)
N = CFG.n_layers


@pytest.fixture(scope="module")
def model() -> HookedCoT:
    return random_model(CFG)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, CFG.d_vocab, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def run(model, tokens):
    with torch.no_grad():
        return model.run_with_cache(tokens)


def raw(cache, name: str) -> torch.Tensor:
    return cache.cache_dict[name]


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = CFG.norm_eps) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 / (x32.pow(2).mean(-1, keepdim=True) + eps).sqrt()).to(x.dtype)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------- accumulated_resid
@pytest.mark.parametrize("layer", [-1, None, N])
def test_accumulated_resid_minus_one_none_and_n_layers_reach_the_unembedding(run, layer):
    _, cache = run
    stack, labels = cache.accumulated_resid(layer=layer, return_labels=True)
    expected = [raw(cache, f"blocks.{i}.hook_resid_pre") for i in range(N)] + [raw(cache, f"blocks.{N - 1}.hook_resid_post")]
    assert labels == [f"{i}_pre" for i in range(N)] + ["final_post"]
    assert torch.equal(stack, torch.stack(expected))


def test_accumulated_resid_at_layer_k_includes_k_pre(run):
    _, cache = run
    stack, labels = cache.accumulated_resid(layer=1, return_labels=True)
    assert labels == ["0_pre", "1_pre"]
    assert torch.equal(stack[-1], raw(cache, "blocks.1.hook_resid_pre"))
    _, labels = cache.accumulated_resid(layer=2, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"]
    stack, labels = cache.accumulated_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"] and torch.equal(stack[-1], raw(cache, "blocks.1.hook_resid_mid"))


def test_accumulated_resid_apply_ln_is_the_logit_lens_for_the_full_stack(model, run):
    logits, cache = run
    lens = cache.accumulated_resid(layer=-1, apply_ln=True)
    for i in range(N):
        close(lens[i], rms(raw(cache, f"blocks.{i}.hook_resid_pre"), model.ln_final.weight))
    close(lens[-1], raw(cache, "ln_final.hook_normalized"))
    close(lens[-1] @ model.W_U, logits, tol=1e-4)


def test_accumulated_resid_apply_ln_at_layer_k_uses_that_blocks_cached_scale(model, run):
    _, cache = run
    lens = cache.accumulated_resid(layer=2, apply_ln=True)
    scale, w = raw(cache, "blocks.2.ln1.hook_scale"), model.blocks[2].ln1.weight
    for i in range(3):
        close(lens[i], w * raw(cache, f"blocks.{i}.hook_resid_pre") / scale)
    close(lens[-1], raw(cache, "blocks.2.ln1.hook_normalized"))


# --------------------------------------------------------------------- decompose_resid / apply_ln_to_stack
@pytest.mark.parametrize("layer", [-1, None, N])
def test_decompose_resid_of_the_full_stack_sums_to_the_final_residual(run, layer):
    _, cache = run
    parts, labels = cache.decompose_resid(layer=layer, return_labels=True)
    assert labels == ["embed"] + [f"{i}_{k}" for i in range(N) for k in ("attn_out", "mlp_out")]
    close(parts.sum(0), raw(cache, f"blocks.{N - 1}.hook_resid_post"))


def test_decompose_resid_at_layer_k_and_mlp_input_and_modes(run):
    _, cache = run
    close(cache.decompose_resid(layer=2).sum(0), raw(cache, "blocks.2.hook_resid_pre"))
    close(cache.decompose_resid(layer=1, mlp_input=True).sum(0), raw(cache, "blocks.1.hook_resid_mid"))
    _, labels = cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)
    assert labels == [f"{i}_attn_out" for i in range(N)]
    mlp = cache.decompose_resid(mode="mlp", incl_embeds=False)
    assert torch.equal(mlp, torch.stack([raw(cache, f"blocks.{i}.hook_mlp_out") for i in range(N)]))
    assert cache.decompose_resid(layer=0).shape[0] == 1  # just the embedding


@pytest.mark.parametrize("layer", [-1, None, N])
def test_apply_ln_to_stack_of_the_full_stack_uses_the_final_norm(run, layer):
    _, cache = run
    normed = cache.apply_ln_to_stack(cache.decompose_resid(layer=-1), layer=layer).sum(0)
    close(normed, raw(cache, "ln_final.hook_normalized"), tol=1e-4)


def test_apply_ln_to_stack_at_a_block_uses_its_ln1_or_ln2(run):
    _, cache = run
    close(cache.apply_ln_to_stack(cache.decompose_resid(layer=1), layer=1).sum(0),
          raw(cache, "blocks.1.ln1.hook_normalized"), tol=1e-4)
    close(cache.decompose_resid(layer=1, mlp_input=True, apply_ln=True).sum(0),
          raw(cache, "blocks.1.ln2.hook_normalized"), tol=1e-4)


# --------------------------------------------------------------------- pos_slice
def test_an_integer_pos_slice_drops_the_position_axis(run):
    _, cache = run
    last = cache.accumulated_resid(pos_slice=-1)
    assert last.shape == (N + 1, 2, CFG.d_model)
    assert torch.equal(last, cache.accumulated_resid()[:, :, -1])
    assert cache.decompose_resid(pos_slice=3).shape == (1 + 2 * N, 2, CFG.d_model)
    assert cache.accumulated_resid(pos_slice=(1, 4)).shape == (N + 1, 2, 3, CFG.d_model)
    assert cache.accumulated_resid(pos_slice=[0, 5]).shape == (N + 1, 2, 2, CFG.d_model)


def test_direct_logit_attribution_recipe_gives_batch_by_component_and_sums_to_the_logit_difference(model, run, tokens):
    logits, cache = run
    answers, wrong = torch.tensor([5, 9]), torch.tensor([11, 2])
    direction = (model.W_U[:, answers] - model.W_U[:, wrong]).T  # [batch, d_model]
    stack = cache.decompose_resid(layer=-1, pos_slice=-1)  # [component, batch, d_model]
    attrs = (cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * direction).sum(-1)
    assert attrs.shape == (1 + 2 * N, 2)
    rows = torch.arange(2)
    close(attrs.sum(0), logits[rows, -1, answers] - logits[rows, -1, wrong], tol=1e-4)


# --------------------------------------------------------------------- keys
def test_negative_layers_in_tuple_keys_count_from_the_end(run):
    _, cache = run
    assert cache["scale", -1, "ln1"] is raw(cache, f"blocks.{N - 1}.ln1.hook_scale")
    assert cache["resid_post", -1] is raw(cache, f"blocks.{N - 1}.hook_resid_post")
    assert cache["mlp_out", -N] is raw(cache, "blocks.0.hook_mlp_out")


def test_in_is_false_for_names_that_are_not_there_or_not_names(model, tokens, run):
    _, cache = run
    assert "pattern" not in cache and "no_such_thing" not in cache and 3 not in cache
    assert "blocks.0.hook_resid_pre" in cache and ("resid_pre", 0) in cache
    _, small = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    assert ("resid_pre", 1) not in small


# --------------------------------------------------------------------- batch axis and caching options
def test_remove_batch_dim_in_both_forms(model, tokens):
    with torch.no_grad():
        _, full = model.run_with_cache(tokens[:1])
        _, bare = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert not bare.has_batch_dim and full.has_batch_dim
    assert set(bare.keys()) == set(full.keys())
    for name in full.keys():
        assert torch.equal(bare.cache_dict[name], full.cache_dict[name][0]), name
    assert full.remove_batch_dim() is full and not full.has_batch_dim
    assert torch.equal(full.cache_dict["hook_embed"], bare.cache_dict["hook_embed"])
    assert bare.accumulated_resid(pos_slice=-1, apply_ln=True).shape == (N + 1, CFG.d_model)
    close(bare.apply_ln_to_stack(bare.decompose_resid()).sum(0), bare.cache_dict["ln_final.hook_normalized"], tol=1e-4)


def test_remove_batch_dim_refuses_a_batch_of_two(run, model, tokens):
    _, cache = run
    with pytest.raises(ValueError, match="apply_slice_to_batch_dim"):
        cache.apply_slice_to_batch_dim((0, 2)).remove_batch_dim()
    with pytest.raises(ValueError, match="batch of 1"):
        model.run_with_cache(tokens, remove_batch_dim=True)


def test_apply_slice_to_batch_dim(run):
    _, cache = run
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and torch.equal(one.cache_dict["hook_embed"], raw(cache, "hook_embed")[1])
    both = cache.apply_slice_to_batch_dim([1, 0])
    assert both.has_batch_dim and torch.equal(both.cache_dict["hook_embed"], raw(cache, "hook_embed").flip(0))
    # DLA on one row of a batched cache: the scale follows batch_slice.
    normed = cache.apply_ln_to_stack(cache.decompose_resid(), batch_slice=1).sum(0)
    close(normed, raw(cache, "ln_final.hook_normalized")[1], tol=1e-4)


def test_run_with_cache_pos_slice_keeps_those_positions_on_each_position_axis(model, tokens, run):
    _, full = run
    with torch.no_grad():
        _, last = model.run_with_cache(tokens, pos_slice=-1)
        _, span = model.run_with_cache(tokens, pos_slice=(2, 5))
    assert torch.equal(last["resid_post", 0], raw(full, "blocks.0.hook_resid_post")[:, -1:])
    assert torch.equal(last["blocks.1.attn.hook_q"], raw(full, "blocks.1.attn.hook_q")[:, -1:])
    assert torch.equal(span["blocks.1.attn.hook_z"], raw(full, "blocks.1.attn.hook_z")[:, 2:5])
    assert torch.equal(span["blocks.0.ln1.hook_scale"], raw(full, "blocks.0.ln1.hook_scale")[:, 2:5])


def test_cache_to_moves_in_place_and_toggle_autodiff_sets_global_grad_mode(run):
    _, cache = run
    assert cache.to("cpu") is cache
    before = torch.is_grad_enabled()
    try:
        cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
        cache.toggle_autodiff(True)
        assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(before)


def test_run_with_cache_can_return_a_plain_dict(model, tokens):
    _, store = model.run_with_cache(tokens, names_filter="hook_embed", return_cache_object=False)
    assert type(store) is dict and list(store) == ["hook_embed"]


# --------------------------------------------------------------------- reset_hooks
def test_reset_hooks_removes_hooks_added_by_an_enclosing_hooks_block(model, tokens):
    calls = []
    other = random_model(CFG, seed=1)

    def count(x, hook):
        calls.append(hook.name)

    with model.hooks([("hook_embed", count)]), other.hooks([("hook_embed", count)]):
        with model.hooks([("blocks.0.hook_resid_post", count)]):
            model.reset_hooks()
            model(tokens)
            assert calls == [] and model.active_hook_names() == []
        model(tokens)  # leaving the inner block does not bring the outer block's hook back
        assert calls == []
        other(tokens)  # another model's hooks are its own
        assert calls == ["hook_embed"]
    model.add_hook("hook_embed", count)
    model.reset_hooks()
    model(tokens)
    assert calls == ["hook_embed"]


# --------------------------------------------------------------------- config
def test_cfg_device_follows_the_model(model):
    assert model.cfg.device == "cpu"
    moved = random_model(CFG, seed=2).to("meta")
    assert moved.cfg.device == "meta"
    assert moved.cfg == CFG  # device describes where the model is, not its math


def test_transformer_lens_config_fields(model):
    c = model.cfg
    assert c.d_vocab_out == CFG.d_vocab and c.positional_embedding_type == "rotary"
    assert c.normalization_type == "RMS" and c.act_fn == "silu" and c.gated_mlp and not c.attn_only
    assert isinstance(c.default_prepend_bos, bool) and isinstance(c.tokenizer_name, str)
    hidden = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith("weight") and any(k in n for k in ("_proj",)))
    assert c.n_params == hidden
    assert c.n_params_total == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------- loading
def test_loaded_weights_take_gradients_without_extra_memory(tiny_checkpoints):
    model = HookedCoT.from_pretrained(tiny_checkpoints["qwen2"])
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert model.cfg.device == "cpu"
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not model(tokens).requires_grad
    model(tokens).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    frozen = HookedCoT.from_pretrained(tiny_checkpoints["qwen2"], requires_grad=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_transformer_lens_loading_options(smol_path, smol_model):
    with pytest.warns(UserWarning, match="never folds"):
        model = HookedCoT.from_pretrained(smol_path, fold_ln=True, center_writing_weights=True,
                                          default_prepend_bos=False, default_padding_side="right")
    assert model.cfg.default_prepend_bos is False and model.tokenizer.padding_side == "right"
    assert model.to_tokens("Hello").shape[1] == smol_model.to_tokens("Hello", prepend_bos=False).shape[1]
    tokens = smol_model.to_tokens("The cat sat on the")
    with torch.no_grad():
        assert torch.equal(model(tokens), smol_model(tokens))  # the flags change no weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = HookedCoT.from_pretrained_no_processing(smol_path)
    assert plain.cfg.default_prepend_bos == bool(plain.tokenizer.add_bos)
    with pytest.raises(TypeError, match="unknown options"):
        HookedCoT.from_pretrained(smol_path, fold_layer_norm=True)


# --------------------------------------------------------------------- per-head / per-neuron decompositions
BIASED = CFG.replace(o_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def biased_run(tokens):
    model = random_model(BIASED, seed=4)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        _, with_result = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_result"))
    return model, logits, cache, with_result


def test_compute_head_results_equals_the_models_own_hook_result(biased_run):
    model, _, cache, recorded = biased_run
    heads, labels = cache.stack_head_results(return_labels=True)
    assert labels == model.all_head_labels() and heads.shape == (N * CFG.n_heads, 2, 7, CFG.d_model)
    for l in range(N):
        close(heads[l * CFG.n_heads:(l + 1) * CFG.n_heads], recorded.cache_dict[f"blocks.{l}.attn.hook_result"].movedim(2, 0))
        close(heads[l * CFG.n_heads:(l + 1) * CFG.n_heads].sum(0) + model.blocks[l].attn.o_proj.bias,
              raw(cache, f"blocks.{l}.hook_attn_out"))
    with_rest = cache.stack_head_results(layer=2, incl_remainder=True, pos_slice=-1)
    close(with_rest.sum(0), raw(cache, "blocks.2.hook_resid_pre")[:, -1])


def test_neuron_results_sum_to_the_mlp_output_less_its_bias(biased_run):
    model, _, cache, _ = biased_run
    neurons, labels = cache.stack_neuron_results(layer=2, return_labels=True)
    assert labels[:2] == ["L0N0", "L0N1"] and len(labels) == 2 * CFG.d_mlp
    for l in range(2):
        part = neurons[l * CFG.d_mlp:(l + 1) * CFG.d_mlp].sum(0)
        close(part + model.blocks[l].mlp.down_proj.bias, raw(cache, f"blocks.{l}.hook_mlp_out"), tol=1e-4)
    some = cache.stack_neuron_results(layer=1, neuron_slice=[3, 5], pos_slice=-1)
    w = model.blocks[0].mlp.down_proj.weight
    close(some[1], raw(cache, "blocks.0.mlp.hook_post")[:, -1, 5, None] * w[:, 5])


@pytest.mark.parametrize("expand_neurons", [True, False])
def test_full_resid_decomposition_sums_to_the_residual(biased_run, expand_neurons):
    model, _, cache, _ = biased_run
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=expand_neurons, return_labels=True)
    assert labels[-2:] == ["embed", "bias"] and len(labels) == stack.shape[0]
    close(stack.sum(0), raw(cache, f"blocks.{N - 1}.hook_resid_post"), tol=1e-4)
    mid = cache.get_full_resid_decomposition(layer=1, mlp_input=True, expand_neurons=expand_neurons)
    close(mid.sum(0), raw(cache, "blocks.1.hook_resid_mid"), tol=1e-4)
    hand = sum(model.blocks[i].attn.o_proj.bias + model.blocks[i].mlp.down_proj.bias for i in range(2))
    close(model.accumulated_bias(2), hand)


def test_logit_attrs_sum_to_the_logit_difference(biased_run):
    model, logits, cache, _ = biased_run
    answers, wrong = torch.tensor([5, 9]), torch.tensor([11, 2])
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), answers, incorrect_tokens=wrong, pos_slice=-1)
    rows = torch.arange(2)
    close(attrs.sum(0), logits[rows, -1, answers] - logits[rows, -1, wrong], tol=1e-4)
    close(model.tokens_to_residual_directions(7), model.W_U[:, 7])
    assert model.tokens_to_residual_directions(answers).shape == (2, CFG.d_model)


# --------------------------------------------------------------------- TL's hook handling
def test_prepend_permanent_hooks_and_hook_dict(tokens):
    model = random_model(CFG, seed=5)
    order = []
    model.add_hook("hook_embed", lambda x, h: order.append("a"))
    model.add_hook("hook_embed", lambda x, h: order.append("b"), prepend=True)
    model.add_perma_hook("hook_embed", lambda x, h: order.append("perma"))
    model.hook_dict["blocks.0.hook_resid_pre"].add_hook(lambda x, h: order.append("point"))
    model(tokens)
    assert order == ["b", "a", "perma", "point"]
    model.reset_hooks()
    order.clear(); model(tokens)
    assert order == ["perma"]
    model.reset_hooks(including_permanent=True)
    order.clear(); model(tokens)
    assert order == [] and model.active_hook_names() == []
    point = model.hook_dict["hook_embed"]
    point.add_hook(lambda x, h: order.append("x"))
    point.remove_hooks()
    model(tokens)
    assert order == [] and point.name == "hook_embed"


def test_backward_hooks_see_the_gradient_of_their_activation(tokens):
    model = random_model(CFG, seed=6)
    name = "blocks.1.hook_resid_post"
    logits, cache = model.run_with_cache(tokens, names_filter=name, detach=False)
    (oracle,) = torch.autograd.grad(logits.sum(), [cache[name]])
    seen = []
    model.run_with_hooks(tokens, bwd_hooks=[(name, lambda g, h: seen.append((h.name, g)))]).sum().backward()
    assert [n for n, _ in seen] == [name]
    close(seen[0][1], oracle)
    model.zero_grad()
    loss, grads = model.run_with_cache(tokens, names_filter=name, incl_bwd=True, return_type="loss")
    plain_loss, kept = model.run_with_cache(tokens, names_filter=name, detach=False, return_type="loss")
    (loss_oracle,) = torch.autograd.grad(plain_loss, [kept[name]])
    close(loss, plain_loss)
    close(grads[name + "_grad"], loss_oracle)
    assert not grads[name + "_grad"].requires_grad
    with pytest.raises(ValueError, match="scalar"):
        model.run_with_cache(tokens, names_filter=name, incl_bwd=True)
    # reset_hooks(direction="fwd") keeps backward hooks
    model.add_hook(name, lambda g, h: seen.append(("bwd", g)), dir="bwd")
    model.add_hook(name, lambda x, h: seen.append(("fwd", x)))
    model.reset_hooks(direction="fwd")
    seen.clear()
    model(tokens).sum().backward()
    assert [n for n, _ in seen] == ["bwd"]
    model.reset_hooks()


def test_hook_points_list_the_hooks_a_forward_would_call(tokens):
    model = random_model(CFG, seed=7)
    point = model.hook_dict["hook_embed"]
    model.add_perma_hook("hook_embed", lambda x, h: None)
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, h: None)], bwd_hooks=[("hook_embed", lambda g, h: (g * 2,))]):
        assert len(point.fwd_hooks) == 2 and len(point.bwd_hooks) == 1
        embed_grad = []
        model.add_hook("hook_embed", lambda g, h: embed_grad.append(g), dir="bwd")
        model(tokens).sum().backward()  # a hook returning TL's (grad,) tuple replaces the gradient
    assert len(point.fwd_hooks) == 1 and len(point.bwd_hooks) == 1
    model.remove_all_hook_fns()
    assert len(point.fwd_hooks) == 1 and point.bwd_hooks == []
    model.remove_all_hook_fns(including_permanent=True)
    assert point.fwd_hooks == [] and model.active_hook_names() == []
    model.zero_grad()
    model(tokens).sum().backward()
    plain = model.embed.weight.grad.clone()
    model.zero_grad()
    with model.hooks(bwd_hooks=[("hook_embed", lambda g, h: (g * 2,))]):
        model(tokens).sum().backward()
    close(model.embed.weight.grad, 2 * plain)  # untied: the embedding's gradient comes through hook_embed alone


def test_projected_neuron_and_full_decompositions_equal_the_projection_of_the_unprojected(biased_run):
    model, _, cache, _ = biased_run
    one, two = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(8)), torch.randn(CFG.d_model, 3)
    for project in (one, two):
        for apply_ln in (False, True):
            full = cache.stack_neuron_results(-1, pos_slice=-1, apply_ln=apply_ln, incl_remainder=True)
            close(cache.stack_neuron_results(-1, pos_slice=-1, apply_ln=apply_ln, incl_remainder=True, project_output_onto=project),
                  full @ project, tol=1e-4)
            for expand in (True, False):
                whole = cache.get_full_resid_decomposition(pos_slice=-1, apply_ln=apply_ln, expand_neurons=expand)
                close(cache.get_full_resid_decomposition(pos_slice=-1, apply_ln=apply_ln, expand_neurons=expand,
                                                         project_output_onto=project), whole @ project, tol=1e-4)
    close(cache.get_neuron_results(1, project_output_onto=two), cache.get_neuron_results(1) @ two, tol=1e-4)
    # the projected, normalised decomposition sums to the normalised residual's projection
    total = cache.get_full_resid_decomposition(apply_ln=True, project_output_onto=one).sum(0)
    close(total, raw(cache, "ln_final.hook_normalized") @ one, tol=1e-4)


def test_input_to_embed_then_start_at_layer_zero_is_the_plain_forward(model, tokens):
    resid, toks, shortformer, mask = model.input_to_embed(tokens)
    assert shortformer is None and mask is None and torch.equal(toks, tokens)
    with torch.no_grad():
        assert torch.equal(resid, model.W_E[tokens])
        close(model(resid, start_at_layer=0), model(tokens))
        close(model(resid, start_at_layer=0, tokens=toks, return_type="loss"), model(tokens, return_type="loss"))
    with pytest.raises(ValueError, match="rotary"):
        model(tokens, shortformer_pos_embed=resid)


def test_set_use_attn_result_records_head_results_by_default(tokens):
    model = random_model(BIASED, seed=9)
    with torch.no_grad():
        _, before = model.run_with_cache(tokens)
        model.set_use_attn_result(True)
        _, after = model.run_with_cache(tokens)
    assert "blocks.0.attn.hook_result" not in before and "blocks.0.attn.hook_result" in after
    close(after["result", 0].sum(2) + model.blocks[0].attn.o_proj.bias, after["attn_out", 0])
    model.set_use_attn_result(False)
    assert "blocks.0.attn.hook_result" not in model.run_with_cache(tokens)[1]


def test_get_act_name_reads_transformer_lens_compact_keys():
    from hookedcot import get_act_name

    assert get_act_name("scale4ln1") == "blocks.4.ln1.hook_scale"
    assert get_act_name("normalized1ln2") == "blocks.1.ln2.hook_normalized"
    assert get_act_name("resid_pre3") == "blocks.3.hook_resid_pre" == get_act_name("resid_pre", 3)
    assert get_act_name("pattern0") == "blocks.0.attn.hook_pattern"
    with pytest.raises(KeyError, match="per-layer"):
        get_act_name("resid_pre")
