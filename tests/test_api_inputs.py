"""Every bad input at the API gets a clear error or a documented behaviour (hookedcot/inputs.py's
table), one test each; a rejected call changes nothing."""

from __future__ import annotations

import pytest
import torch
from model_factory import CharTokenizer, random_model

from hookedcot import HookError, HookNameError, ModelConfig
from hookedcot import hook_points
from hookedcot.errors import HookedCoTError
from hookedcot.hook_points import _SCOPED, NonFiniteError
from hookedcot.inputs import InputError
from hookedcot.interp import Site, prepare_runs, run_sites
from hookedcot.kv_cache import KVCache

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128, n_ctx=16)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=7, tokenizer=CharTokenizer())


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CFG.d_vocab, (2, 6), generator=torch.Generator().manual_seed(7))


def test_input_errors_are_hookedcot_errors_and_value_errors():
    assert issubclass(InputError, HookedCoTError) and issubclass(InputError, ValueError)
    assert issubclass(NonFiniteError, HookError) and issubclass(NonFiniteError, HookedCoTError)


def test_token_ids_outside_the_vocabulary_name_the_first_bad_id_and_where_it_is(model, tokens):
    bad = tokens.clone()
    bad[1, 4] = CFG.d_vocab + 3
    with pytest.raises(InputError, match=r"got 131 at \[batch, pos\] = \[1, 4\]"):
        model(bad)
    bad[1, 4] = -1
    with pytest.raises(InputError, match=r"must lie in \[0, 128\).*got -1"):
        model.run_with_cache(bad)
    with pytest.raises(InputError, match="outside|must lie"):
        model.generate(bad, max_new_tokens=2)
    assert _SCOPED.get() == ()


def test_an_empty_prompt_is_refused_and_an_empty_batch_runs_to_empty_results(model):
    with pytest.raises(InputError, match="no positions"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="no positions"):
        model("")  # the character tokenizer adds no BOS
    with pytest.raises(InputError, match="at least one position"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(InputError, match="no positions"):
        model.generate("", max_new_tokens=2)
    empty = torch.zeros(0, 5, dtype=torch.long)
    assert model(empty).shape == (0, 5, CFG.d_vocab)
    logits, cache = model.run_with_cache(empty)
    assert logits.shape == (0, 5, CFG.d_vocab) and cache["blocks.1.hook_resid_post"].shape == (0, 5, CFG.d_model)


def test_sequences_past_the_context_length_are_refused_before_anything_runs(model):
    fired = []
    with pytest.raises(InputError, match="17 positions .* cfg.n_ctx = 16"):
        model.run_with_hooks(torch.zeros(1, 17, dtype=torch.long), fwd_hooks=[("hook_embed", lambda x, h: fired.append(1))])
    assert fired == []
    kv = KVCache(CFG, 1, 32, model.dtype, "cpu")
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long), past_kv=kv)
    with pytest.raises(InputError, match=r"17 positions \(10 cached \+ 7 new\)"):
        model(torch.zeros(1, 7, dtype=torch.long), past_kv=kv)
    assert kv.length == 10  # the rejected call changed nothing
    with pytest.raises(InputError, match="ask for at most 6 new tokens"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=7)


def test_an_attention_mask_of_the_wrong_shape_or_values_is_refused(model, tokens):
    with pytest.raises(InputError, match=r"shape \(2, 5\); expected \(2, 6\)"):
        model(tokens, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(InputError, match=r"0 \(padding\) and 1 \(token\) only; got values \[1, 2\]"):
        model(tokens, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 2]] * 2))
    assert model(tokens, attention_mask=torch.ones(2, 6, dtype=torch.bool)).shape == (2, 6, CFG.d_vocab)


def test_an_all_zero_mask_row_is_refused_by_its_row_number(model, tokens):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(InputError, match=r"rows \[1\] are all zeros"):
        model(tokens, attention_mask=mask)
    with pytest.raises(InputError, match=r"rows \[1\] are all zeros"):
        model.generate(tokens, attention_mask=mask, max_new_tokens=2)


def test_right_padding_gives_each_rows_own_logits_in_a_forward_and_is_refused_by_generate(model, tokens):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)
        alone = model(tokens[1:, :4])
    torch.testing.assert_close(padded[1, :4], alone[0])  # causal: pads after a token are never seen
    with pytest.raises(InputError, match=r"left padding; attention_mask rows \[1\]"):
        model.generate(tokens, attention_mask=mask, max_new_tokens=2)


def test_check_finite_names_the_first_hook_that_produces_nan_or_inf(model, tokens):
    def make_nan(x, hook):
        return x * float("nan")

    def make_inf_in_place(x, hook):
        x[..., 0] = float("inf")

    def passes_it_on(x, hook):
        return x + 1

    hooks = [("blocks.0.hook_attn_out", passes_it_on), ("blocks.0.hook_resid_mid", make_nan),
             ("blocks.1.hook_resid_pre", passes_it_on)]
    with torch.no_grad():
        assert model.run_with_hooks(tokens, fwd_hooks=hooks).isnan().all()  # off by default: NaN flows on
        model.check_finite = True
        try:
            with pytest.raises(NonFiniteError, match=r"make_nan on 'blocks.0.hook_resid_mid' turned a finite"):
                model.run_with_hooks(tokens, fwd_hooks=hooks)
            with pytest.raises(NonFiniteError, match="make_inf_in_place on 'blocks.1.mlp.hook_post'.* 12 inf"):
                model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", make_inf_in_place)])
            model.add_hook("blocks.0.hook_mlp_out", make_nan)
            with pytest.raises(NonFiniteError, match="make_nan on 'blocks.0.hook_mlp_out'"):
                model(tokens)
            model.reset_hooks()
            # -inf in the scores is how a hook masks a position: allowed
            def mask_first(x, hook):  # queries after the first stop seeing the first key
                x[..., 1:, 0] = float("-inf")
            out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_attn_scores", mask_first)])
            assert out.isfinite().all()
        finally:
            model.check_finite = False
            model.reset_hooks()
    assert _SCOPED.get() == ()


def test_check_finite_costs_nothing_where_no_hook_listens(model, tokens, monkeypatch):
    calls = []
    real = hook_points._finite
    monkeypatch.setattr(hook_points, "_finite", lambda name, x: calls.append(name) or real(name, x))
    model.check_finite = True
    try:
        with torch.no_grad():
            model(tokens)
            assert calls == []
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, h: x)])
    finally:
        model.check_finite = False
    assert calls == ["blocks.1.hook_resid_post"] * 2  # the activation before, the replacement after


def test_a_hook_returning_another_dtype_or_device_is_refused_by_name(model, tokens):
    with pytest.raises(HookError, match=r"'blocks.0.hook_resid_post' returned .* dtype torch.float64"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, h: x.double())])
    with pytest.raises(HookError, match="'blocks.1.attn.hook_z' returned a tensor on meta; expected cpu"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", lambda x, h: x.to("meta"))])
    assert _SCOPED.get() == ()


def test_positions_outside_the_sequence_are_refused(model, tokens):
    with pytest.raises(InputError, match=r"pos_slice=6 selects positions outside the sequence.*6 positions"):
        model.run_with_cache(tokens, pos_slice=6)
    with pytest.raises(InputError, match="pos_slice"):
        model.run_with_cache(tokens, pos_slice=[0, -7])
    _, cache = model.run_with_cache(tokens, pos_slice=-6)  # in range: fine
    assert cache["hook_embed"].shape == (2, 1, CFG.d_model)
    with pytest.raises(InputError, match=r"position_ids has shape \(2, 3\); expected \(2, 6\)"):
        model(tokens, position_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="position_ids must be >= 0"):
        model(tokens, position_ids=torch.full((2, 6), -1))
    runs = prepare_runs(model, tokens[:1], tokens[1:], ["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match=r"positions \[6\] fall outside the 6-token prompt"):
        run_sites(runs, [Site("blocks.0.hook_resid_pre", (6,))], lambda logits: logits[:, -1, 0], progress=False)


@pytest.mark.parametrize("name, hint", [
    ("hook_pos_embed", "no positional embedding"),
    ("hook_tokens", "no token hook"),
    ("blocks.1.hook_attn_in", "blocks.1.hook_q_input .* hook_k_input and hook_v_input"),
])
def test_transformer_lens_names_we_do_not_have_say_what_to_hook_instead(model, tokens, name, hint):
    if name in model.hook_names():  # TransformerLens' optional hooks, once hookedcot has them, just work
        model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, h: None)])
        return
    with pytest.raises(HookNameError, match=hint):
        model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, h: None)])
    with pytest.raises(HookNameError, match="TransformerLens|rotary|token hook"):
        model.add_hook(name, lambda x, h: None)
    assert model._persistent == {}
