"""SAEs in SAELens and sparsify layouts, attached by hook name; feature edits in a forward and
during generation. Oracles are written here by hand (the encoder formulas, the folders)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hookedcot import ModelConfig
from hookedcot.dictionaries.sae import SAE, FeatureEdit, load_sae, sparsify_hook_name
from model_factory import random_model

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                  norm_eps=1e-6, model_name="tiny")
D_SAE = 48
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(32, D_SAE, generator=g) * 0.3, "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
            "W_dec": torch.randn(D_SAE, 32, generator=g) * 0.3, "b_dec": torch.randn(32, generator=g) * 0.1,
            "threshold": torch.rand(D_SAE, generator=g) * 0.5}


def write_saelens(folder, arch: str, old: bool = False, k: int = 5):
    folder.mkdir(parents=True)
    w = weights()
    if arch != "jumprelu":
        w.pop("threshold")
    save_file(w, folder / "sae_weights.safetensors")
    if old:
        cfg = {"d_in": 32, "d_sae": D_SAE, "hook_point": HOOK, "activation_fn_str": "topk" if arch == "topk" else "relu",
               "activation_fn_kwargs": {"k": k} if arch == "topk" else {}}
    else:
        cfg = {"d_in": 32, "d_sae": D_SAE, "architecture": arch, "metadata": {"hook_name": HOOK}, **({"k": k} if arch == "topk" else {})}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return w


def by_hand(x, w, arch, k=5):
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return torch.clamp(pre, min=0)
    if arch == "jumprelu":
        return torch.where((pre > w["threshold"]) & (pre > 0), pre, torch.zeros(()))
    flat, out = pre.reshape(-1, D_SAE), torch.zeros(pre.reshape(-1, D_SAE).shape)
    for r, row in enumerate(flat):
        for j in sorted(range(D_SAE), key=lambda j: -float(row[j]))[:k]:
            out[r, j] = max(float(row[j]), 0.0)
    return out.reshape(pre.shape)


@pytest.mark.parametrize("arch, old", [("standard", False), ("jumprelu", False), ("topk", False),
                                       ("standard", True), ("topk", True)])  # older files: hook_point, activation_fn_str
def test_a_saelens_folder_written_by_hand_loads_and_encodes_as_computed_by_hand(model, tmp_path, arch, old):
    w = write_saelens(tmp_path / "sae", arch, old)
    sae = load_sae(tmp_path / "sae")
    assert sae.hook_name == HOOK and sae.architecture == arch
    _, cache = model.run_with_cache(torch.randint(0, 128, (2, 7)), names_filter=[HOOK])
    x = cache[HOOK]
    assert torch.allclose(sae.encode(x), by_hand(x, w, arch), atol=1e-6)
    assert torch.allclose(sae.decode(sae.encode(x)), by_hand(x, w, arch) @ w["W_dec"] + w["b_dec"], atol=1e-5)


def test_our_saes_save_in_the_saelens_layout_and_load_back(tmp_path):
    w = weights()
    sae = SAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], architecture="jumprelu", threshold=w["threshold"], hook_name=HOOK)
    folder = sae.save(tmp_path / "ours")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == D_SAE and cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["hook_name"] == HOOK == cfg["hook_name"]
    again = load_sae(folder)
    x = torch.randn(3, 32)
    assert torch.equal(again.encode(x), sae.encode(x)) and again.hook_name == HOOK


@pytest.mark.parametrize("transposed", [False, True])
def test_a_sparsify_folder_loads_with_module_names_mapped_to_hook_names(model, tmp_path, transposed):
    w = weights(1)
    for module in ("layers.1", "layers.2.mlp"):
        sub = tmp_path / "sp" / module
        sub.mkdir(parents=True)
        dec = w["W_dec"].T.contiguous() if transposed else w["W_dec"]
        save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": dec,
                   "b_dec": w["b_dec"]}, sub / "sae.safetensors")
        (sub / "cfg.json").write_text(json.dumps({"k": 5, "num_latents": D_SAE}))
    saes = load_sae(tmp_path / "sp")
    assert set(saes) == {"blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"}  # layers.N.mlp is the MLP's output
    sae = saes["blocks.1.hook_resid_post"]
    x = torch.randn(4, 32)
    assert torch.allclose(sae.encode(x), by_hand(x, w, "topk"), atol=1e-6)
    assert torch.allclose(sae.decode(sae.encode(x)), by_hand(x, w, "topk") @ w["W_dec"] + w["b_dec"], atol=1e-5)
    assert sparsify_hook_name("model.layers.7.self_attn") == "blocks.7.hook_attn_out"
    with pytest.raises(ValueError, match="pass hook_name="):
        sparsify_hook_name("layers.3.mlp.act")


@pytest.fixture(scope="module")
def sae():
    w = weights(2)
    return SAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], hook_name=HOOK)


def test_attached_with_the_error_term_the_sae_is_the_identity_bitwise(model, sae):
    tokens = torch.randint(0, 128, (2, 9))
    plain = model(tokens)
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[sae.hook()]), plain)
    acts = sae.encode(model.run_with_cache(tokens, names_filter=[HOOK])[1][HOOK])
    pos, feature = (acts == 0).all(dim=0).nonzero()[0].tolist()  # a ReLU SAE has zeros: one of them
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[sae.hook(FeatureEdit("zero", [feature], positions=[pos]))])
    assert torch.equal(zeroed, plain)  # zeroing a feature that is zero changes nothing
    live_pos, live_feature = (acts[0] > 0).nonzero()[0].tolist()
    assert not torch.equal(model.run_with_hooks(tokens, fwd_hooks=[sae.hook(FeatureEdit("zero", [live_feature], positions=[live_pos]))]), plain)
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[sae.hook(FeatureEdit("scale", None, 1.0))]), plain)
    without = model.run_with_hooks(tokens, fwd_hooks=[sae.hook(error=False)])
    assert not torch.equal(without, plain)  # the reconstruction alone is not the activation


def test_feature_edits_change_exactly_the_chosen_features_and_positions(model, sae):
    tokens = torch.randint(0, 128, (1, 8))
    seen = {}

    def spy(edit):
        def fn(features, hook):
            out = edit(features, hook)
            seen["before"], seen["after"] = features, out
            return out
        return fn

    model.run_with_hooks(tokens, fwd_hooks=[sae.hook(spy(FeatureEdit("clamp", [3, 7], 2.5, positions=[2, 5])))])
    before, after = seen["before"], seen["after"]
    assert torch.all(after[0, [2, 5]][:, [3, 7]] == 2.5)
    mask = torch.ones_like(before, dtype=torch.bool)
    mask[0, 2, 3] = mask[0, 2, 7] = mask[0, 5, 3] = mask[0, 5, 7] = False
    assert torch.equal(after[mask], before[mask])
    source = torch.full((1, 8, D_SAE), 9.0)
    model.run_with_hooks(tokens, fwd_hooks=[sae.hook(spy(FeatureEdit("patch", [1], positions="from 6", source=source)))])
    assert torch.all(seen["after"][0, 6:, 1] == 9.0) and torch.equal(seen["after"][0, :6], seen["before"][0, :6])


def test_a_feature_edit_during_generation_equals_the_same_edit_in_a_forward_over_the_generated_tokens(model, sae):
    prompt = torch.randint(0, 128, (1, 6))
    edit = FeatureEdit("scale", [0, 1, 2, 3, 4, 5], 3.0, positions="from 4")
    out = model.generate(prompt, 6, fwd_hooks=[sae.hook(edit)], stop_at_eos=False).clone()
    with torch.no_grad():
        logits = model.run_with_hooks(out, fwd_hooks=[sae.hook(edit)])
        unedited = model(out)
    assert not torch.equal(logits, unedited)  # the edit does something
    assert torch.equal(logits[0, 5:-1].argmax(-1), out[0, 6:])


def test_bad_folders_and_shapes_are_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="sparsify"):
        load_sae(tmp_path / "empty")
    w = weights()
    with pytest.raises(ValueError, match="W_dec"):
        SAE(w["W_enc"], w["b_enc"], w["W_dec"].T, w["b_dec"])
    with pytest.raises(ValueError, match="needs k"):
        SAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], architecture="topk")
    with pytest.raises(ValueError, match="unknown feature edit"):
        FeatureEdit("double")


EDITS = [None, FeatureEdit("zero", [3, 7], positions=[2, 5]), FeatureEdit("scale", None, 2.5, positions="from 4"),
         FeatureEdit("clamp", [1, -2], 0.75, positions="last 2"), FeatureEdit("scale", [0, 2], 0.0),
         FeatureEdit("clamp", list(range(0, D_SAE, 3)), 1.25, positions=[-1, 0]),
         FeatureEdit("zero", list(range(D_SAE)), positions=slice(1, 8, 2))]


@pytest.mark.parametrize("error", [True, False])
@pytest.mark.parametrize("edit", EDITS, ids=lambda e: "none" if e is None else f"{e.op}-{e.positions}")
def test_a_declarative_splice_equals_the_hook_function_bit_for_bit(model, sae, edit, error):
    """`sae.hook(FeatureEdit)` is a declarative intervention (it runs inside the fast decode step);
    the same edit passed as a plain function takes the hook-function path. Same logits, bitwise."""
    from hookedcot.dictionaries.sae import SAESplice

    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    name, splice = sae.hook(edit, error=error)
    assert isinstance(splice, SAESplice) and splice.declarative
    as_function = sae.hook((lambda f, h: edit(f, h)) if edit is not None else (lambda f, h: f), error=error)
    assert not isinstance(as_function[1], SAESplice)
    edited = model.run_with_hooks(tokens, fwd_hooks=[(name, splice)])
    assert torch.equal(edited, model.run_with_hooks(tokens, fwd_hooks=[as_function]))
    if edit is not None and error:  # a real edit moves the logits (two no-ops would also compare equal)
        assert not torch.equal(edited, model(tokens))


def test_a_declarative_splice_generates_on_the_fast_path_as_the_hook_function_does_eagerly(model, sae):
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    edit = FeatureEdit("scale", [0, 1, 2, 3, 4, 5], 3.0, positions="from 4")
    fast = model.generate(prompt, 8, fwd_hooks=[sae.hook(edit)], stop_at_eos=False, output_logits=True)
    slow = model.generate(prompt, 8, fwd_hooks=[sae.hook(lambda f, h: edit(f, h))], stop_at_eos=False,
                          output_logits=True, decode="eager")
    assert (fast.decode, slow.decode) == ("static", "eager")
    assert torch.equal(fast.sequences, slow.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fast.logits, slow.logits))
    on_heads = SAE(*(torch.randn(*shape, generator=torch.Generator().manual_seed(9)) * 0.3
                     for shape in ((8, 12), (12,), (12, 8), (8,))), hook_name="blocks.1.attn.hook_z")
    head_edit = FeatureEdit("scale", [0, 5], 2.0, positions="from 3")  # [b p h d_sae]: positions on axis 1
    tokens = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(7))  # p = 6 ≠ h = 4
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[on_heads.hook(head_edit)]),
                       model.run_with_hooks(tokens, fwd_hooks=[on_heads.hook(lambda f, h: head_edit(f, h))]))
    patch = FeatureEdit("patch", [1], positions="from 6", source=torch.zeros(1, 8, D_SAE))
    assert not getattr(sae.hook(patch)[1], "declarative", False)  # a patch reads a source per call: a hook function
