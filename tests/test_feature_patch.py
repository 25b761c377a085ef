"""Patching one model's dictionary features into another's: in a forward (against an oracle that
encodes, swaps and decodes by hand) and during generation, where the source runs in lockstep
(against a forward over the generated tokens with the source's features computed afterwards)."""

from __future__ import annotations

import pytest
import torch

from hookedcot import ModelConfig
from hookedcot.dictionaries.evaluation import evaluate_accuracy
from hookedcot.dictionaries.feature_patch import FeaturePatch, JointEdit, generate_with
from hookedcot.dictionaries.sae import SAE, FeatureEdit
from model_factory import CharTokenizer, random_model

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                  norm_eps=1e-6, model_name="tiny")
HOOK = "blocks.1.hook_resid_post"
FEATURES = [0, 3, 5, 7, 11, 20, 31]


@pytest.fixture(scope="module")
def models():
    return random_model(CFG, seed=0, tokenizer=CharTokenizer()), random_model(CFG, seed=1, tokenizer=CharTokenizer())


@pytest.fixture(scope="module")
def sae():
    g = torch.Generator().manual_seed(3)
    return SAE(torch.randn(32, 48, generator=g) * 0.5, torch.randn(48, generator=g) * 0.1,
               torch.randn(48, 32, generator=g) * 0.5, torch.randn(32, generator=g) * 0.1, hook_name=HOOK)


def by_hand(base, child, sae, tokens, features):
    """base's logits with child's features written in at HOOK, computed without FeatureEdit."""
    _, cb = base.run_with_cache(tokens, names_filter=HOOK)
    _, cc = child.run_with_cache(tokens, names_filter=HOOK)
    x = cb[HOOK]
    fb = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    fc = ((cc[HOOK] - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    swapped = fb.clone()
    swapped[..., features] = fc[..., features]
    patched = x + (swapped @ sae.W_dec + sae.b_dec) - (fb @ sae.W_dec + sae.b_dec)
    return base.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: patched)])


def test_a_patch_in_a_forward_equals_the_swap_done_by_hand(models, sae):
    base, child = models
    tokens = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    patch = FeaturePatch(child, sae, FEATURES).prepare(tokens)
    got = base.run_with_hooks(tokens, fwd_hooks=patch.fwd_hooks())
    torch.testing.assert_close(got, by_hand(base, child, sae, tokens, FEATURES), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base(tokens), atol=1e-3)  # the patch changes something
    nothing = FeaturePatch(child, sae, []).prepare(tokens)
    assert torch.equal(base.run_with_hooks(tokens, fwd_hooks=nothing.fwd_hooks()), base(tokens))
    itself = FeaturePatch(base, sae, FEATURES).prepare(tokens)  # a model patched from itself is itself
    assert torch.equal(base.run_with_hooks(tokens, fwd_hooks=itself.fwd_hooks()), base(tokens))


def test_a_patch_during_generation_equals_the_patch_in_a_forward_over_the_generated_tokens(models, sae):
    base, child = models
    prompt = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    patch = FeaturePatch(child, sae, FEATURES, positions="from 4")
    out = generate_with(base, prompt, 8, [patch], stop_at_eos=False).clone()
    assert out.shape == (1, 15)
    plain = base.generate(prompt, 8, stop_at_eos=False)
    assert not torch.equal(out, plain)  # the patch steers the generation
    _, cache = child.run_with_cache(out, names_filter=HOOK)
    edit = FeatureEdit("patch", features=FEATURES, positions="from 4", source=sae.encode(cache[HOOK]))
    logits = base.run_with_hooks(out, fwd_hooks=[sae.hook(edit)])
    assert torch.equal(logits[0, 6:-1].argmax(-1), out[0, 7:])


def test_left_padded_rows_generate_as_they_do_alone(models, sae):
    base, child = models
    texts = ["ab", "a longer prompt"]
    together = generate_with(base, texts, 5, [FeaturePatch(child, sae, FEATURES)])
    alone = [generate_with(base, t, 5, [FeaturePatch(child, sae, FEATURES)]) for t in texts]
    assert together == alone


def test_a_patch_counts_as_an_intervention_in_the_accuracy_table(models, sae):
    base, child = models
    problems = [("What is 1 + 1?", "2"), ("What is 2 + 2?", "4")]
    results = evaluate_accuracy(base, problems, {"baseline": [], "child features": FeaturePatch(child, sae, FEATURES),
                                                 "both": [FeaturePatch(child, sae, FEATURES), sae.hook()]},
                                chat=False, max_new_tokens=6, batch_size=2, progress=False)
    assert [r.name for r in results] == ["baseline", "child features", "both"]
    assert results[0].completions != results[1].completions and results[1].completions == results[2].completions


def test_misuse_is_explained(models, sae):
    base, child = models
    tokens = torch.randint(1, 128, (1, 5))
    with pytest.raises(RuntimeError, match="prepare"):
        base.run_with_hooks(tokens, fwd_hooks=FeaturePatch(child, sae, FEATURES).fwd_hooks())
    with pytest.raises(RuntimeError, match="on_token"):
        patch = FeaturePatch(child, sae, FEATURES).prepare(tokens, max_new_tokens=3)
        base.generate(tokens, 3, fwd_hooks=patch.fwd_hooks())
    short = FeatureEdit("patch", source=torch.zeros(1, 5, 48))
    with pytest.raises(ValueError, match="covers 5 positions"):
        base.generate(tokens, 2, fwd_hooks=[sae.hook(short)])
    with pytest.raises(ValueError, match="crosscoder"):
        FeaturePatch(child, sae, FEATURES, source=1)


def crosscoder():
    from hookedcot.dictionaries.crosscoder import CrossCoder

    g = torch.Generator().manual_seed(4)
    return CrossCoder(torch.randn(2, 32, 48, generator=g) * 0.4, torch.randn(48, generator=g) * 0.1,
                      torch.randn(48, 2, 32, generator=g) * 0.4, torch.randn(2, 32, generator=g) * 0.1,
                      input_scale=torch.tensor([0.7, 1.3]), models=["base", "child"], hook_name=HOOK)


def joint_latent(coder, x_base, x_child):
    """The crosscoder's joint latent, by hand."""
    return (x_base * 0.7 @ coder.W_enc[0] + x_child * 1.3 @ coder.W_enc[1] + coder.b_enc).relu()


def test_a_crosscoder_patch_swaps_the_features_decoder_contributions_on_the_joint_latent(models):
    base, child = models
    coder = crosscoder()
    tokens = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    patch = FeaturePatch(child, coder, FEATURES, source="child", target="base").prepare(tokens)
    got = base.run_with_hooks(tokens, fwd_hooks=patch.fwd_hooks())
    _, cb = base.run_with_cache(tokens, names_filter=HOOK)
    _, cc = child.run_with_cache(tokens, names_filter=HOOK)
    chosen = torch.zeros(2, 9, 48)
    chosen[..., FEATURES] = joint_latent(coder, cb[HOOK], cc[HOOK])[..., FEATURES]
    patched = cb[HOOK] + chosen @ coder.W_dec[:, 1] / 1.3 - chosen @ coder.W_dec[:, 0] / 0.7
    want = base.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: patched)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, base(tokens), atol=1e-3)
    with pytest.raises(ValueError, match="same model"):
        FeaturePatch(child, coder, FEATURES, source="base", target="base")


def test_a_joint_edit_during_generation_equals_the_edit_by_hand_over_the_generated_tokens(models):
    base, child = models
    coder = crosscoder()
    prompt = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    edit = JointEdit(base, coder, FeatureEdit("scale", FEATURES, value=3.0), model="child")
    out = generate_with(child, prompt, 8, [edit], stop_at_eos=False).clone()
    assert not torch.equal(out, child.generate(prompt, 8, stop_at_eos=False))
    _, cb = base.run_with_cache(out, names_filter=HOOK)

    def by_hand(x, hook):
        f = joint_latent(coder, cb[HOOK], x)
        return x + (2.0 * f[..., FEATURES]) @ coder.W_dec[FEATURES, 1] / 1.3

    logits = child.run_with_hooks(out, fwd_hooks=[(HOOK, by_hand)])
    assert torch.equal(logits[0, 5:-1].argmax(-1), out[0, 6:])
    one = JointEdit(base, coder, FeatureEdit("scale", FEATURES, value=1.0), model="child").prepare(out)
    assert torch.equal(child.run_with_hooks(out, fwd_hooks=one.fwd_hooks()), child(out))  # ×1 is the identity


def test_patching_every_latent_makes_the_target_the_source_up_to_their_reconstruction_errors(models):
    base, child = models
    coder = crosscoder()
    tokens = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    patch = FeaturePatch(child, coder, None, source="child", target="base").prepare(tokens)
    seen = {}
    base.run_with_hooks(tokens, fwd_hooks=[*patch.fwd_hooks(), (HOOK, lambda x, hook: seen.update(x=x))])
    _, cb = base.run_with_cache(tokens, names_filter=HOOK)
    _, cc = child.run_with_cache(tokens, names_filter=HOOK)
    f = joint_latent(coder, cb[HOOK], cc[HOOK])
    recon_b = (f @ coder.W_dec[:, 0] + coder.b_dec[0]) / 0.7
    recon_c = (f @ coder.W_dec[:, 1] + coder.b_dec[1]) / 1.3
    want = cc[HOOK] + (cb[HOOK] - recon_b) - (cc[HOOK] - recon_c)
    torch.testing.assert_close(seen["x"], want, atol=1e-4, rtol=1e-4)


def test_a_partner_is_never_silently_stale_and_a_model_can_be_its_own_partner_while_generating(models, sae):
    base, child = models
    patch = FeaturePatch(child, sae, FEATURES).prepare(torch.randint(1, 128, (1, 9)))
    with pytest.raises(RuntimeError, match=r"call \.prepare"):
        base.run_with_hooks(torch.randint(1, 128, (1, 6)), fwd_hooks=patch.fwd_hooks())
    with pytest.raises(RuntimeError, match=r"1 row\(s\).*2 row\(s\)"):
        base.run_with_hooks(torch.randint(1, 128, (2, 9)), fwd_hooks=patch.fwd_hooks())
    with pytest.raises(ValueError, match="out of range"):
        FeaturePatch(child, sae, [48])
    prompt = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(8))
    itself = generate_with(base, prompt, 6, [FeaturePatch(base, sae, FEATURES)], stop_at_eos=False)
    assert torch.equal(itself, base.generate(prompt, 6, stop_at_eos=False))
