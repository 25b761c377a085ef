"""Declarative interventions equal the hook a user writes by hand: in a forward pass, through
every way hooks attach, and during generation on the fast (static) path. The oracles are plain
closures over `hook.positions`, sharing no code with `hookedcot.interp.interventions`."""

from __future__ import annotations

import pytest
import torch
from model_factory import random_model

from hookedcot import ModelConfig
from hookedcot.interp.interventions import (AddVector, Clamp, MeanFill, Record, ReplaceFrom, ScaleDirection,
                                            SetValue)

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=130,
                  qkv_bias=True, norm_eps=1e-6)
RESID = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 130, (2, 9), generator=torch.Generator().manual_seed(4))


def logits_with(model, tokens, name, fn, **kw):
    return model.run_with_hooks(tokens, fwd_hooks=[(name, fn)], **kw)


POSITION_CASES = [  # (spec, the positions of a 9-token sequence it selects)
    (None, list(range(9))), ("from 5", [5, 6, 7, 8]), ("last 2", [7, 8]), ([1, -1], [1, 8]),
    (slice(2, -3, 2), [2, 4]), (3, [3]),
]


@pytest.mark.parametrize("spec, chosen", POSITION_CASES)
def test_add_vector_equals_a_hand_written_add_at_the_same_positions(model, tokens, spec, chosen):
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))

    def by_hand(x, hook):
        x = x.clone()
        x[:, chosen] += 2.5 * v
        return x

    got = logits_with(model, tokens, RESID, AddVector(v, 2.5, positions=spec))
    assert torch.equal(got, logits_with(model, tokens, RESID, by_hand))


def test_scale_direction_equals_the_projection_written_out(model, tokens):
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    u = v / v.norm()

    def by_hand(x, hook):
        return x + (0.25 - 1) * (x @ u)[..., None] * u

    got = logits_with(model, tokens, RESID, ScaleDirection(v, 0.25))
    torch.testing.assert_close(got, logits_with(model, tokens, RESID, by_hand), rtol=0, atol=1e-5)


def test_set_value_on_heads_and_positions_equals_zeroing_them_by_hand(model, tokens):
    def by_hand(x, hook):
        x = x.clone()
        x[:, 4:, [0, 3]] = 0
        return x

    name = "blocks.0.attn.hook_z"
    got = logits_with(model, tokens, name, SetValue(0.0, positions="from 4", heads=[0, -1]))
    assert torch.equal(got, logits_with(model, tokens, name, by_hand))


def test_clamp_on_neurons_equals_clamping_them_by_hand(model, tokens):
    def by_hand(x, hook):
        x = x.clone()
        x[..., [3, 7]] = x[..., [3, 7]].clamp(-0.1, 0.2)
        return x

    name = "blocks.2.mlp.hook_post"
    assert torch.equal(logits_with(model, tokens, name, Clamp(-0.1, 0.2, units=[3, 7])),
                       logits_with(model, tokens, name, by_hand))


def test_mean_fill_per_position_equals_indexing_the_means_by_hand(model, tokens):
    means = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))  # shorter than the prompt

    def by_hand(x, hook):
        x = x.clone()
        for p in range(x.shape[1]):
            x[:, p] = means[p] if p < 6 else means.mean(0)
        return x

    got = logits_with(model, tokens, RESID, MeanFill(means, per_position=True))
    assert torch.equal(got, logits_with(model, tokens, RESID, by_hand))


def test_replace_from_takes_each_rows_stored_activation_at_the_same_position(model, tokens):
    _, cache = model.run_with_cache(tokens.flip(0), names_filter=RESID)
    stored = cache[RESID]

    def by_hand(x, hook):
        x = x.clone()
        x[:, 2:5] = stored[[1, 0]][:, 2:5]
        return x

    got = logits_with(model, tokens, RESID, ReplaceFrom(stored, rows=[1, 0], positions=[2, 3, 4]))
    assert torch.equal(got, logits_with(model, tokens, RESID, by_hand))
    with pytest.raises(ValueError, match="past the stored activation"):
        model.run_with_hooks(torch.cat([tokens, tokens], 1), fwd_hooks=[(RESID, ReplaceFrom(stored))])


def test_record_writes_what_run_with_cache_holds(model, tokens):
    rec = Record.for_hook(model, RESID, batch=2, capacity=12)
    model.run_with_hooks(tokens, fwd_hooks=[(RESID, rec)])
    _, cache = model.run_with_cache(tokens, names_filter=RESID)
    assert torch.equal(rec.buffer[:, :9], cache[RESID])
    assert not rec.buffer[:, 9:].any()


def test_an_intervention_works_through_hooks_and_add_hook_alike(model, tokens):
    iv = AddVector(torch.ones(32), 0.5, positions="from 3")
    direct = logits_with(model, tokens, RESID, iv)
    with model.hooks([(RESID, iv)]):
        in_block = model(tokens)
    model.add_hook(RESID, iv)
    try:
        persistent = model(tokens)
    finally:
        model.reset_hooks()
    assert torch.equal(direct, in_block) and torch.equal(direct, persistent)
    assert not torch.equal(direct, model(tokens))


def test_identity_settings_leave_the_forward_bit_for_bit_unchanged(model, tokens):
    plain = model(tokens)
    assert torch.equal(logits_with(model, tokens, RESID, AddVector(torch.ones(32), 0.0)), plain)
    assert torch.equal(logits_with(model, tokens, RESID, ScaleDirection(torch.ones(32), 1.0)), plain)


def test_a_callable_position_spec_works_but_is_not_declarative(model, tokens):
    iv = AddVector(torch.ones(32), 1.0, positions=lambda pos: pos % 2 == 0)
    assert not iv.declarative and AddVector(torch.ones(32), positions="last 3").declarative

    def by_hand(x, hook):
        x = x.clone()
        x[:, ::2] += 1.0
        return x

    assert torch.equal(logits_with(model, tokens, RESID, iv), logits_with(model, tokens, RESID, by_hand))


def test_interventions_during_generation_equal_their_python_hooks(model):
    """The fast (static) path with interventions against the eager loop with hand-written hooks:
    same tokens, logits within float32 reordering (the static cache attends over every slot)."""
    prompt = torch.randint(0, 130, (2, 6), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    v = torch.randn(32, generator=torch.Generator().manual_seed(9))

    def steer(x, hook):
        return torch.where((hook.positions >= 7)[None, :, None], x + 3.0 * v, x)

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 1] = 0
        return x

    kw = dict(attention_mask=mask, stop_at_eos=False, output_logits=True)
    fast = model.generate(prompt, 12, decode="static", fwd_hooks=[
        (RESID, AddVector(v, 3.0, positions="from 7")), ("blocks.0.attn.hook_z", SetValue(0.0, heads=1))], **kw)
    with pytest.warns(UserWarning, match="Python function"):
        eager = model.generate(prompt, 12, fwd_hooks=[(RESID, steer), ("blocks.0.attn.hook_z", zero_head)], **kw)
    assert torch.equal(fast.sequences, eager.sequences)
    for a, b in zip(fast.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
