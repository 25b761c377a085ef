"""TransformerLens surface added for TL's own tests (issue 14): TL's key/value cache object, hook
attributes that answer HookPoint calls, the unembedding's hooks, an assignable
`cfg.default_prepend_bos`, `set_tokenizer` with a transformers tokenizer, and generate's TL checks.
Oracles: full forwards without a cache, rows run alone, hand-counted token ids, transformers'
tokenizer."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from model_factory import random_model

from hookedcot import HookedCoT, HookedTransformerKeyValueCache, ModelConfig
from hookedcot.tokenizer import NoTokenizerError, TokenizerError, TokenNotFoundError

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=97,
                  qkv_bias=True)


@pytest.fixture(scope="module")
def model() -> HookedCoT:
    return random_model(CFG)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(1, CFG.d_vocab, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def smol_tok_model(smol) -> HookedCoT:
    """A tiny random model with SmolLM2's tokenizer (which adds no BOS by itself)."""
    cfg = dataclasses.replace(CFG, d_vocab=smol.tokenizer.vocab_size, n_layers=1)
    return random_model(cfg, tokenizer=copy.deepcopy(smol.tokenizer))


# ---------------------------------------------------------------- TL's key/value cache object
@torch.no_grad()
def test_tl_cache_in_pieces_equals_one_forward(model, tokens):
    full = model(tokens)
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])
    parts = [model(tokens[:, :4], past_kv_cache=cache), model(tokens[:, 4:7], past_kv_cache=cache),
             model(tokens[:, 7:], past_kv_cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 9 and cache.entries[0].past_keys.shape == (2, 9, CFG.n_key_value_heads, CFG.d_head)
    assert cache.previous_attention_mask.shape == (2, 9)


@torch.no_grad()
def test_a_frozen_tl_cache_is_used_but_not_extended(model, tokens):
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, batch_size=2)
    model(tokens[:, :5], past_kv_cache=cache)
    cache.freeze()
    a = model(tokens[:, 5:7], past_kv_cache=cache)
    b = model(tokens[:, 5:7], past_kv_cache=cache)  # the same continuation of the same prefix
    assert cache.length == 5 and cache.entries[2].past_keys.shape[1] == 5
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, model(tokens[:, :7])[:, 5:], rtol=1e-5, atol=1e-5)
    cache.unfreeze()
    model(tokens[:, 5:7], past_kv_cache=cache)
    assert cache.length == 7


@torch.no_grad()
def test_tl_cache_mask_covers_the_new_tokens_and_masks_a_skipped_one(model, tokens):
    """TL's convention: the mask given with a cache covers only the new tokens; a 0 drops that
    token, so the rest continue as if it were never there."""
    row = tokens[:1]
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, batch_size=1)
    model(row[:, :4], past_kv_cache=cache)
    junk = torch.tensor([[5]])
    out = model(torch.cat([row[:, 4:6], junk, row[:, 6:7]], 1), past_kv_cache=cache,
                attention_mask=torch.tensor([[1, 1, 0, 1]]))
    torch.testing.assert_close(out[:, -1], model(row[:, :7])[:, -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_tl_cache_right_padded_prefix_rows_equal_their_rows_alone(smol_tok_model):
    m = smol_tok_model
    pad = m.tokenizer.pad_token_id
    short, long = m.to_tokens("It is", prepend_bos=False)[0], m.to_tokens("I would rather be here", prepend_bos=False)[0]
    prefix = torch.full((2, long.shape[0]), pad)
    prefix[0, : short.shape[0]], prefix[1] = short, long
    post = m.to_tokens([" by the sea", " by the sea"], prepend_bos=False)
    cache = HookedTransformerKeyValueCache.init_cache(m.cfg, batch_size=2)
    m(prefix, past_kv_cache=cache, padding_side="right")
    out = m(post, past_kv_cache=cache, padding_side="right")
    alone = m(torch.cat([short, post[0]])[None])[0, -post.shape[1]:]
    torch.testing.assert_close(out[0], alone, rtol=1e-4, atol=1e-4)


def test_a_failed_forward_leaves_the_tl_cache_as_it_was(model, tokens):
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, batch_size=2)
    with torch.no_grad():
        model(tokens[:, :4], past_kv_cache=cache)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model.run_with_hooks(tokens[:, 4:6], past_kv_cache=cache, fwd_hooks=[("ln_final.hook_scale", boom)])
    assert cache.length == 4 and cache.entries[-1].past_keys.shape[1] == 4
    assert cache.previous_attention_mask.shape == (2, 4)


# ---------------------------------------------------------------- hook attributes, unembed hooks
def test_module_hook_attributes_take_hooks_for_their_model(model, tokens):
    seen = []
    model.blocks[1].attn.hook_z.add_hook(lambda x, hook: seen.append((hook.name, tuple(x.shape))))
    model.hook_embed.add_hook(lambda x, hook: seen.append((hook.name, tuple(x.shape))))
    try:
        assert len(model.blocks[1].attn.hook_z.fwd_hooks) == 1
        with torch.no_grad():
            model(tokens)
    finally:
        model.reset_hooks()
    assert seen == [("hook_embed", (2, 9, 32)), ("blocks.1.attn.hook_z", (2, 9, 4, 8))]
    assert model.blocks[1].attn.hook_z == "blocks.1.attn.hook_z" and model.blocks[1].attn.hook_z.name == "blocks.1.attn.hook_z"
    assert model.blocks[1].attn.hook_z.fwd_hooks == []


def test_a_deep_copy_binds_hook_attributes_to_the_copy_and_pickling_keeps_names(model, tokens):
    twin = copy.deepcopy(model)
    fired = []
    twin.blocks[0].hook_resid_post.add_hook(lambda x, hook: fired.append("twin"))
    with torch.no_grad():
        model(tokens)
        assert fired == []
        twin(tokens)
    assert fired == ["twin"]
    assert type(pickle.loads(pickle.dumps(model.blocks[0].hook_resid_post))) is str


@torch.no_grad()
def test_unembed_hooks_see_the_final_normed_residual_and_the_logits(model, tokens):
    logits, cache = model.run_with_cache(tokens)
    assert list(cache.keys())[-2:] == ["unembed.hook_in", "unembed.hook_out"]
    torch.testing.assert_close(cache["unembed.hook_in"], cache["ln_final.hook_normalized"], rtol=0, atol=0)
    torch.testing.assert_close(cache["unembed.hook_out"], logits, rtol=0, atol=0)
    torch.testing.assert_close(cache["unembed.hook_in"] @ model.W_U, logits, rtol=1e-5, atol=1e-5)
    doubled = model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_in", lambda x, hook: 2 * x)])
    torch.testing.assert_close(doubled, 2 * logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- BOS default and tokenizers
def test_default_prepend_bos_true_prepends_bos_on_a_tokenizer_that_adds_none(smol_path):
    m = HookedCoT.from_pretrained(smol_path, default_prepend_bos=True)
    bos = m.tokenizer.bos_token_id
    plain = m.tokenizer.encode("Hello world", add_special_tokens=False)
    assert m.to_tokens("Hello world")[0].tolist() == [bos] + plain
    assert m.to_str_tokens("Hello world")[0] == m.tokenizer.bos_token
    assert m.get_token_position(bos, "Hello world") == 0
    assert m.to_tokens("Hello world", prepend_bos=False)[0].tolist() == plain


def test_assigning_cfg_default_prepend_bos_changes_the_text_methods(smol_tok_model):
    m = smol_tok_model
    bos = m.tokenizer.bos_token_id
    assert m.cfg.default_prepend_bos is False and m.to_tokens("a b")[0, 0] != bos
    m.cfg.default_prepend_bos = True
    try:
        assert m.to_tokens("a b")[0, 0] == bos
        assert m("a b").shape[1] == m.to_tokens("a b", prepend_bos=False).shape[1] + 1
    finally:
        m.cfg.default_prepend_bos = False
    assert m.to_tokens("a b")[0, 0] != bos
    with pytest.raises(dataclasses.FrozenInstanceError, match="replace"):
        m.cfg.d_model = 64


def test_set_tokenizer_accepts_a_transformers_tokenizer_with_the_same_ids(smol_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    m = HookedCoT(dataclasses.replace(CFG, d_vocab=len(hf)))
    assert m.tokenizer is None
    m.set_tokenizer(hf, default_padding_side="right")
    text = "Hello, world! 12345 café"
    assert m.to_tokens(text, prepend_bos=False)[0].tolist() == hf(text, add_special_tokens=False)["input_ids"]
    assert m.tokenizer.padding_side == "right" and m.tokenizer.name_or_path == hf.name_or_path
    assert HookedCoT(m.cfg, tokenizer=hf).to_single_token(" Solid") == hf.convert_tokens_to_ids("ĠSolid")


def test_token_not_found_is_a_tokenizer_error_and_an_assertion_error(smol_tok_model):
    with pytest.raises(TokenNotFoundError) as err:
        smol_tok_model.get_token_position(" zebra", "no such animal here")
    assert isinstance(err.value, TokenizerError) and isinstance(err.value, AssertionError)


# ---------------------------------------------------------------- generate's TL checks
def test_generate_drops_transformers_only_flags_with_a_warning(smol_tok_model):
    with pytest.warns(UserWarning, match="unsupported generation kwargs ignored: output_scores, output_attentions"):
        out = smol_tok_model.generate("Hi", max_new_tokens=2, output_scores=True, output_attentions=True)
    assert isinstance(out, str)
    with pytest.raises(TypeError):
        smol_tok_model.generate("Hi", max_new_tokens=2, no_such_option=True)


def test_generate_one_row_of_ids_as_str_gives_a_string(smol_tok_model):
    ids = smol_tok_model.to_tokens("Hi there")
    assert isinstance(smol_tok_model.generate(ids, max_new_tokens=2, return_type="str"), str)
    assert isinstance(smol_tok_model.generate(["Hi there"], max_new_tokens=2), list)


def test_generate_without_tokenizer_refuses_text_and_an_unknowable_eos(model):
    bare = HookedCoT(CFG)
    bare.load_state_dict(model.state_dict())
    with pytest.raises(NoTokenizerError) as err:
        bare.generate("hello", max_new_tokens=2)
    assert isinstance(err.value, AssertionError)
    with pytest.raises(AssertionError, match="eos_token_id"):
        bare.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, stop_at_eos=True)
    out = bare.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, stop_at_eos=True, eos_token_id=0)
    assert out.shape[0] == 1


# ---------------------------------------------------------------- split q/k/v inputs, mlp_in
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def test_split_qkv_inputs_change_nothing_until_edited_and_have_tl_shapes(model, tokens):
    plain = model(tokens)
    names = ["blocks.1.hook_q_input", "blocks.1.hook_k_input", "blocks.1.hook_v_input"]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    assert cache[names[0]].shape == (2, 9, 4, 32) and cache[names[1]].shape == (2, 9, 2, 32)
    _, full = model.run_with_cache(tokens)
    assert names[0] not in full
    model.set_use_split_qkv_input(True)
    try:
        _, full = model.run_with_cache(tokens)
    finally:
        model.set_use_split_qkv_input(False)
    assert all(n in full for n in names)


@torch.no_grad()
def test_editing_one_kv_heads_key_input_moves_that_heads_keys_only(model, tokens):
    delta = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(9))

    def shift_head_1(x, hook):
        x[:, :, 1] += delta
        return x

    _, base = model.run_with_cache(tokens, names_filter=["blocks.2.hook_resid_pre", "blocks.2.attn.hook_k"])
    _, edited = model.run_with_cache(tokens, names_filter=["blocks.2.attn.hook_k", "blocks.2.attn.hook_q"],
                                     fwd_hooks=[("blocks.2.hook_k_input", shift_head_1)])
    block = model.blocks[2]
    x = _rms(base["blocks.2.hook_resid_pre"] + delta, block.ln1.weight, CFG.norm_eps)
    w = block.attn.k_proj.weight.view(2, CFG.d_head, CFG.d_model)[1]
    b = block.attn.k_proj.bias.view(2, CFG.d_head)[1]
    torch.testing.assert_close(edited["blocks.2.attn.hook_k"][:, :, 1], x @ w.T + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(edited["blocks.2.attn.hook_k"][:, :, 0], base["blocks.2.attn.hook_k"][:, :, 0],
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_hook_mlp_in_feeds_the_mlp_and_not_the_residual(model, tokens):
    names = ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    _, base = model.run_with_cache(tokens, names_filter=names)
    _, edited = model.run_with_cache(tokens, names_filter=names,
                                     fwd_hooks=[("blocks.0.hook_mlp_in", lambda x, hook: x.mul_(0.0))])
    torch.testing.assert_close(edited["blocks.0.hook_resid_mid"], base["blocks.0.hook_resid_mid"], rtol=0, atol=0)
    mlp = model.blocks[0].mlp
    zero_in = torch.zeros(1, CFG.d_model)
    expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(zero_in)) * mlp.up_proj(zero_in))
    torch.testing.assert_close(edited["blocks.0.hook_mlp_out"], expected.expand(2, 9, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(edited["blocks.0.hook_resid_post"], base["blocks.0.hook_resid_mid"] + expected,
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- review: state kept consistent
@torch.no_grad()
def test_a_hook_failing_mid_model_or_a_rejected_input_leaves_the_tl_cache_usable(model, tokens):
    row = tokens[:1]
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, batch_size=1)
    model(row[:, :3], past_kv_cache=cache)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        model.run_with_hooks(row[:, 3:4], past_kv_cache=cache, fwd_hooks=[("blocks.1.hook_resid_pre", boom)])
    with pytest.raises(ValueError):
        model(row[:, 3:4], past_kv_cache=cache, position_ids=torch.tensor([[-1]]))
    assert [e.past_keys.shape[1] for e in cache.entries] == [3, 3, 3]
    assert cache.previous_attention_mask.shape == (1, 3)
    out = model(row[:, 3:5], past_kv_cache=cache)
    torch.testing.assert_close(out, model(row[:, :5])[:, 3:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_tl_cache_full_length_masks_and_input_to_embed_keep_mask_and_keys_in_step(model, tokens):
    row = tokens[:1]
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, batch_size=1)
    resid, toks, _, mask = model.input_to_embed(row[:, :4], past_kv_cache=cache)  # a fresh cache: nothing stored
    assert cache.previous_attention_mask.shape == (1, 0)
    model(resid, start_at_layer=0, tokens=toks, attention_mask=mask, past_kv_cache=cache)
    model(row[:, 4:5], past_kv_cache=cache, attention_mask=torch.ones(1, 5, dtype=torch.long))  # covers the cache too
    assert cache.length == 5 and cache.previous_attention_mask.shape == (1, 5)
    out = model(row[:, 5:6], past_kv_cache=cache)
    torch.testing.assert_close(out, model(row[:, :6])[:, 5:], rtol=1e-5, atol=1e-5)


def test_models_sharing_a_tokenizer_keep_their_own_bos_default(smol_tok_model):
    other = HookedCoT(smol_tok_model.cfg.replace(), tokenizer=smol_tok_model.tokenizer)
    other.cfg.default_prepend_bos = True
    bos = smol_tok_model.tokenizer.bos_token_id
    assert other.to_tokens("a b")[0, 0] == bos and smol_tok_model.to_tokens("a b")[0, 0] != bos
    assert smol_tok_model.tokenizer.add_bos is False  # the shared tokenizer is not changed


def test_an_unpickled_model_keeps_hook_attributes_that_take_hooks(model, tokens):
    twin = pickle.loads(pickle.dumps(model))
    fired = []
    twin.blocks[0].hook_resid_post.add_hook(lambda x, hook: fired.append(hook.name))
    with torch.no_grad():
        twin(tokens)
    assert fired == ["blocks.0.hook_resid_post"]
