"""examples/_child.py: the fine-tuned "child" of seed 003 — it learns, it changes only what it
trains, its cache is keyed by its settings, reloads bitwise, and is never left half written.

On a tiny random-weight model with a one-token-per-character tokenizer (the training code is the
same as on SmolLM2; only the model is small).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hookedcot import HookedCoT, ModelConfig
from hookedcot.interp.data import generate_pairs
from model_factory import CharTokenizer, random_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _child as K  # noqa: E402

SETTINGS = dict(steps=8, n_train=16, lr=1e-2, train_layers=(0, 1), batch_size=4, progress=False)


@pytest.fixture(scope="module")
def tiny() -> HookedCoT:
    cfg = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                      norm_eps=1e-6, model_name="tiny-char")
    return random_model(cfg, tokenizer=CharTokenizer())


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    """(the base's weights before, the child, its cache folder), made once."""
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    cache = tmp_path_factory.mktemp("children")
    return before, K.make_child(tiny, cache, seed=0, **SETTINGS), cache


def mean_reply_loss(model: HookedCoT, problems) -> float:
    rows = [K.encode(model, p) for p in problems]
    with torch.no_grad():
        return float(K.reply_loss(model, *K.batch(rows, model.tokenizer.pad_token_id)))


def test_training_lowers_the_loss_on_the_training_problems(tiny, made):
    _, child, _ = made
    problems = K.training_problems(SETTINGS["n_train"], seed=0)
    assert mean_reply_loss(child, problems) < mean_reply_loss(tiny, problems) - 0.1
    assert child.child_info["from_cache"] is False and len(child.child_info["losses"]) == SETTINGS["steps"]


def test_only_the_trained_tensors_change_and_the_base_is_left_alone(tiny, made):
    before, child, _ = made
    trained = set(K.trained_parameters(child, SETTINGS["train_layers"]))
    assert trained == {f"blocks.{i}.mlp.{w}.weight" for i in (0, 1) for w in ("gate_proj", "up_proj", "down_proj")}
    for name, p in child.named_parameters():
        assert not p.requires_grad
        assert torch.equal(p, before[name]) != (name in trained), name
    for name, p in tiny.named_parameters():
        assert torch.equal(p, before[name]), f"make_child changed the base's {name}"


def test_the_reply_starts_after_the_prompt_and_ends_the_sequence(tiny):
    problem = K.training_problems(1)[0]
    ids, start = K.encode(tiny, problem)
    assert tiny.to_string(ids[start:]) == problem.reasoning  # CharTokenizer has no end-of-turn token
    assert tiny.to_string(ids[:start]).endswith("<assistant>")
    tokens, mask, target = K.batch([(ids, start), (ids[:-5], start)], pad_id=0)
    assert target[1].sum() == len(ids) - 5 - start and mask[1, -5:].sum() == 0 and not target[1, -5:].any()


def test_a_second_call_loads_the_cache_bitwise_without_training(tiny, made, monkeypatch):
    _, child, cache = made

    def no_training(*args, **kwargs):
        raise AssertionError("make_child trained although a cache with the same settings exists")

    monkeypatch.setattr(K, "train", no_training)
    again = K.make_child(tiny, cache, seed=0, **SETTINGS)
    assert again.child_info["from_cache"] is True
    assert again.child_info["folder"] == child.child_info["folder"]
    for (name, a), (_, b) in zip(child.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("change", [{"seed": 1}, {"steps": 9}, {"lr": 2e-2}, {"train_layers": (0,)}])
def test_different_settings_train_into_a_different_folder(tiny, made, change):
    _, child, cache = made
    other = K.make_child(tiny, cache, **{**SETTINGS, "seed": 0, **change})
    assert other.child_info["from_cache"] is False
    assert other.child_info["folder"] != child.child_info["folder"]
    assert Path(other.child_info["folder"]).parent == cache


def test_an_interrupted_save_leaves_no_valid_looking_cache(tiny, tmp_path, monkeypatch):
    def dies_half_way(tensors, path):
        Path(path).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")  # a torn safetensors header
        raise KeyboardInterrupt

    monkeypatch.setattr(K, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        K.make_child(tiny, tmp_path, seed=0, **SETTINGS)
    (folder,) = tmp_path.iterdir()
    assert list(folder.iterdir()) == []  # neither the tensors nor the fingerprint, and no temporary file
    monkeypatch.undo()
    assert K.make_child(tiny, tmp_path, seed=0, **SETTINGS).child_info["from_cache"] is False


def test_tensors_without_a_matching_fingerprint_are_not_a_cache(tiny, made, tmp_path):
    _, child, _ = made
    folder = Path(child.child_info["folder"])
    copy = tmp_path / folder.name
    copy.mkdir()
    (copy / "child.safetensors").write_bytes((folder / "child.safetensors").read_bytes())
    assert K.load_cached(copy, child.child_info["fingerprint"]) is None  # no fingerprint: the save did not finish
    (copy / "fingerprint.json").write_text((folder / "fingerprint.json").read_text().replace('"steps": 8', '"steps": 7'))
    assert K.load_cached(copy, child.child_info["fingerprint"]) is None
    assert K.load_cached(folder, child.child_info["fingerprint"]) is not None


def test_held_out_problems_never_overlap_the_training_problems_nor_their_twins():
    train = {p.question for seed in (0, 1, 12345) for p in K.training_problems(200, seed)}
    for seed in (0, 12345):
        held = K.held_out_problems(40, seed)
        assert len(held) == 40 and len({q for q, _ in held}) == 40
        assert not train & {q for q, _ in held}
        assert all(a.lstrip("-").isdigit() for _, a in held)
    held = {q for q, _ in K.held_out_problems(40, 0)}
    twins = [pair.corrupted.question for pair in generate_pairs(64, seed=0) if pair.clean.question in held]
    assert twins and not train & set(twins)
    assert K.held_out_problems(10) == K.held_out_problems(40)[:10]
