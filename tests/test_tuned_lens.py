"""The tuned lens: identity when untrained, better than the logit lens once trained, files in
tuned-lens' layout and in safetensors, and params.pt read without running pickled code."""

from __future__ import annotations

import json

import pytest
import torch

from hookedcot import HookedCoT
from hookedcot.dictionaries.tuned_lens import TunedLens, train_tuned_lens
from hookedcot.interp.lens import run_logit_lens


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return HookedCoT.from_pretrained(tiny_checkpoints["smollm2_like"]).eval()


def _tokens(model, n_seq: int, n_pos: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n_seq, n_pos), generator=g)


def _resid_pre(model, tokens, layer):
    kept = {}

    def keep(x, hook):
        kept["x"] = x.clone()

    model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", keep)])
    return kept["x"]


def _random_lens(model, seed=1) -> TunedLens:
    lens = TunedLens.zeros(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return lens


def test_a_tuned_lens_with_zero_translators_is_the_logit_lens_exactly(tiny):
    tokens = _tokens(tiny, 1, 12, seed=0)
    plain = run_logit_lens(tiny, tokens[0], targets=[3, 7])
    tuned = run_logit_lens(tiny, tokens[0], targets=[3, 7], tuned=TunedLens.zeros(tiny))
    for kind in ("prob", "logit", "rank"):
        assert torch.equal(getattr(plain, kind).values, getattr(tuned, kind).values)
    assert torch.equal(plain.top_ids, tuned.top_ids)
    assert plain.lens == "logit" and tuned.lens == "tuned"
    for layer in range(tiny.cfg.n_layers):
        resid = _resid_pre(tiny, tokens, layer)
        with torch.no_grad():
            assert torch.equal(TunedLens.zeros(tiny).logits(tiny, resid, layer), tiny.unembed_resid(resid))


def test_the_tuned_rows_of_run_logit_lens_are_the_translated_residual_unembedded(tiny):
    tokens = _tokens(tiny, 1, 10, seed=2)
    lens = _random_lens(tiny)
    result = run_logit_lens(tiny, tokens[0], targets=[5], tuned=lens)
    for layer in range(tiny.cfg.n_layers):
        h = _resid_pre(tiny, tokens, layer)[0]  # [pos, d]
        with torch.no_grad():
            expected = tiny.unembed_resid(h + h @ lens.layer_translators[layer].weight.T + lens.layer_translators[layer].bias)
        assert torch.allclose(result.logit.values[0, layer], expected[:, 5], atol=1e-4)
    assert result.rows[-1] == "final_post"
    assert result.prob.meta["lens"] == "tuned"


def test_a_trained_tuned_lens_is_closer_to_the_final_logits_than_the_logit_lens_at_every_layer(tiny):
    train = _tokens(tiny, 16, 24, seed=3)
    lens, losses = train_tuned_lens(tiny, train, steps=300, lr=3e-3, seed=0, tokens_per_step=64)
    assert losses[-1] < losses[0]
    held_out = _tokens(tiny, 4, 24, seed=4)
    kl = lens.kl_per_layer(tiny, held_out)
    assert (kl["tuned"] < kl["logit"]).all(), kl
    untrained = TunedLens.zeros(tiny).kl_per_layer(tiny, held_out)
    assert torch.equal(untrained["tuned"], untrained["logit"])


def test_training_is_seeded_and_leaves_the_model_unchanged(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    grad_flags = [p.requires_grad for p in tiny.parameters()]
    train = _tokens(tiny, 4, 16, seed=5)
    a, losses_a = train_tuned_lens(tiny, train, steps=5, seed=7)
    b, losses_b = train_tuned_lens(tiny, train, steps=5, seed=7)
    assert losses_a == losses_b
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in tiny.parameters()] == grad_flags


@pytest.mark.parametrize("format, params", [("tuned-lens", "params.pt"), ("safetensors", "params.safetensors")])
def test_save_and_load_round_trip(tiny, tmp_path, format, params):
    lens = _random_lens(tiny)
    folder = lens.save(tmp_path / "lens", format=format)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", params])
    config = json.loads((folder / "config.json").read_text())
    assert config["d_model"] == tiny.cfg.d_model and config["num_hidden_layers"] == tiny.cfg.n_layers
    assert config["lens_type"] == "linear_tuned_lens" and config["bias"] is True
    loaded = TunedLens.load(folder)
    assert loaded.config == lens.config
    for (ka, va), (kb, vb) in zip(lens.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_a_folder_in_tuned_lens_layout_written_by_hand_loads(tiny, tmp_path):
    d, n = tiny.cfg.d_model, tiny.cfg.n_layers
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = torch.full((d, d), 0.01 * i)
        state[f"{i}.bias"] = torch.full((d,), float(i))
    torch.save(state, tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "d_model": d, "num_hidden_layers": n,
        "bias": True, "base_model_revision": None, "unembed_hash": None, "lens_type": "linear_tuned_lens"}))
    lens = TunedLens.load(tmp_path)
    h = torch.randn(3, d)
    i = n - 1
    assert torch.allclose(lens.transform(h, i), h + h @ state[f"{i}.weight"].T + state[f"{i}.bias"])


def test_params_pt_is_read_with_weights_only_and_a_pickle_with_code_is_refused(tiny, tmp_path, monkeypatch):
    folder = TunedLens.zeros(tiny).save(tmp_path / "lens")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    TunedLens.load(folder)
    assert calls == [True]

    ran = []

    class Payload:
        def __reduce__(self):
            return (ran.append, ("code ran",))

    torch.save({"0.weight": Payload()}, folder / "params.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        TunedLens.load(folder)
    assert ran == []


def test_a_config_with_unknown_fields_is_refused_with_their_names(tiny, tmp_path):
    folder = TunedLens.zeros(tiny).save(tmp_path / "lens")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "surprise": 1}))
    with pytest.raises(ValueError, match="surprise"):
        TunedLens.load(folder)
