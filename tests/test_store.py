"""The activation store: two models on exactly the same tokens, shards round-tripping through disk,
an interrupted collection resumed, shuffled minibatches that visit every token once per epoch.
The oracle for stored values is each model run alone on one sequence with `run_with_cache`."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models as tokenizer_models

import hookedcot.dictionaries.store as store_module
from hookedcot import ModelConfig
from hookedcot.dictionaries.store import ActivationStore, collect_activations, generations
from hookedcot.hook_points import HookNameError
from hookedcot.tokenizer import Tokenizer
from model_factory import random_model

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                  norm_eps=1e-6, model_name="tiny")
HOOKS = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]


def sequences(n: int = 13, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (int(torch.randint(4, 19, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    return {"base": random_model(CFG, seed=0), "child": random_model(CFG, seed=1)}


def test_two_models_are_recorded_on_the_same_tokens_and_match_each_model_run_alone(pair, tmp_path):
    seqs = sequences()
    store = collect_activations(pair, seqs, HOOKS, tmp_path / "s", batch_size=4, shard_tokens=40, progress=False)
    assert store.complete and len(store.shards) > 2 and store.models == ["base", "child"]
    assert store.n_tokens == sum(len(s) - 1 for s in seqs)  # skip_first=1 drops each sequence's first token
    assert store.d("blocks.0.mlp.hook_post") == CFG.d_mlp and store.d(HOOKS[0]) == CFG.d_model
    seen = set()
    for i in range(len(store.shards)):
        for hook in HOOKS:
            shard = store.load_shard(i, hook)
            for row in range(len(shard.tokens)):
                seq, pos = int(shard.sequences[row]), int(shard.positions[row])
                assert store.sequence_tokens(seq).tolist() == seqs[seq]
                assert int(shard.tokens[row]) == seqs[seq][pos]
                seen.add((seq, pos))
    assert seen == {(s, p) for s in range(len(seqs)) for p in range(1, len(seqs[s]))}
    shard = store.load_shard(0, HOOKS[0])
    for row in range(0, len(shard.tokens), 7):
        seq, pos = int(shard.sequences[row]), int(shard.positions[row])
        for m, name in enumerate(store.models):
            _, cache = pair[name].run_with_cache(torch.tensor([seqs[seq]]), names_filter=HOOKS[0])
            torch.testing.assert_close(shard.acts[row, m], cache[HOOKS[0]][0, pos], atol=1e-5, rtol=1e-5)
    assert not torch.equal(shard.acts[:, 0], shard.acts[:, 1])  # two different models


def test_statistics_and_scale_follow_the_stored_activations(pair, tmp_path):
    store = collect_activations(pair, sequences(), HOOKS[:1], tmp_path / "s", batch_size=3, shard_tokens=30,
                                progress=False)
    everything = torch.cat([store.load_shard(i, HOOKS[0]).acts for i in range(len(store.shards))])
    stats = store.stats(HOOKS[0])
    for m, name in enumerate(store.models):
        torch.testing.assert_close(stats[name]["mean"], everything[:, m].mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(stats[name]["std"], everything[:, m].std(0, unbiased=False), atol=1e-4, rtol=1e-4)
    normalised = torch.cat([b.acts for b in store.batches(HOOKS[0], 16, normalize=True)])
    assert normalised.norm(dim=-1).mean(0).tolist() == pytest.approx([CFG.d_model**0.5] * 2, rel=1e-4)


def test_shuffled_batches_visit_every_token_once_per_epoch_holding_few_shards(pair, tmp_path, monkeypatch):
    store = collect_activations(pair, sequences(20), HOOKS[:1], tmp_path / "s", batch_size=4, shard_tokens=25,
                                progress=False)
    key = lambda b: [(int(s), int(p)) for s, p in zip(b.sequences, b.positions)]  # noqa: E731
    one = [k for b in store.batches(HOOKS[0], 16, seed=0) for k in key(b)]
    assert sorted(one) == sorted(k for b in store.batches(HOOKS[0], 16, shuffle=False) for k in key(b))
    assert len(one) == len(set(one)) == store.n_tokens
    assert one != [k for b in store.batches(HOOKS[0], 16, seed=1) for k in key(b)]
    assert one == [k for b in store.batches(HOOKS[0], 16, seed=0) for k in key(b)]
    two = [k for b in store.batches(HOOKS[0], 16, seed=0, epochs=2) for k in key(b)]
    assert len(two) == 2 * store.n_tokens and sorted(two) == sorted(one * 2)
    assert all(len(b.tokens) == 16 for b in store.batches(HOOKS[0], 16, drop_last=True))
    loads = []
    original = ActivationStore.load_shard
    monkeypatch.setattr(ActivationStore, "load_shard", lambda self, *a, **k: loads.append(1) or original(self, *a, **k))
    next(store.batches(HOOKS[0], 4, mix=2))
    assert len(loads) == 2 < len(store.shards)  # lazily: the first batch needs two shards, not the store
    forever = store.batches(HOOKS[0], 64, epochs=None, drop_last=True)
    assert sum(len(next(forever).tokens) for _ in range(10)) == 640


def test_an_interrupted_collection_resumes_and_equals_an_uninterrupted_one(pair, tmp_path, monkeypatch):
    seqs = sequences(16)
    kwargs = dict(batch_size=2, shard_tokens=20, progress=False)
    whole = collect_activations(pair, seqs, HOOKS, tmp_path / "whole", **kwargs)
    calls = []
    real_run = store_module._run

    def crash_after_a_while(*args, **kw):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real_run(*args, **kw)

    monkeypatch.setattr(store_module, "_run", crash_after_a_while)
    with pytest.raises(KeyboardInterrupt):
        collect_activations(pair, seqs, HOOKS, tmp_path / "cut", **kwargs)
    partial = ActivationStore(tmp_path / "cut")
    assert 0 < len(partial.shards) < len(whole.shards) and not partial.complete
    monkeypatch.setattr(store_module, "_run", real_run)
    resumed_batches = []
    monkeypatch.setattr(store_module, "_run", lambda *a, **k: resumed_batches.append(1) or real_run(*a, **k))
    resumed = collect_activations(pair, seqs, HOOKS, tmp_path / "cut", **kwargs)
    assert resumed.complete and len(resumed_batches) < 2 * 8  # only the batches not yet on disk ran
    for i in range(len(whole.shards)):
        for hook in HOOKS:
            a, b = whole.load_shard(i, hook), resumed.load_shard(i, hook)
            assert torch.equal(a.acts, b.acts) and torch.equal(a.sequences, b.sequences)
    assert resumed.manifest["stats"] == whole.manifest["stats"]
    # dying between a shard's rename and the manifest's rewrite: the orphan shard is redone, not counted twice
    writes = []
    real_write = store_module._write_json

    def die_on_second_manifest(path, data):
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(store_module, "_write_json", die_on_second_manifest)
    with pytest.raises(KeyboardInterrupt):
        collect_activations(pair, seqs, HOOKS, tmp_path / "orphan", **kwargs)
    monkeypatch.setattr(store_module, "_write_json", real_write)
    assert (tmp_path / "orphan" / "shard_00000.safetensors").exists() and not ActivationStore(tmp_path / "orphan").shards
    again = collect_activations(pair, seqs, HOOKS, tmp_path / "orphan", **kwargs)
    assert again.manifest["stats"] == whole.manifest["stats"] and again.n_tokens == whole.n_tokens
    assert collect_activations(pair, seqs, HOOKS, tmp_path / "cut", **kwargs).n_tokens == whole.n_tokens
    with pytest.raises(ValueError, match="another collection"):
        collect_activations(pair, seqs[:-1], HOOKS, tmp_path / "cut", **kwargs)
    assert not list((tmp_path / "cut").glob("*.tmp"))


def test_two_tokenizers_that_differ_are_refused_naming_the_ids(tmp_path):
    def tok(words):
        return Tokenizer(Backend(tokenizer_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")),
                         {"unk_token": "<unk>"})

    words = ["<unk>", "a", "b", "c"]
    base = random_model(CFG, seed=0, tokenizer=tok(words))
    child = random_model(CFG, seed=1, tokenizer=tok(["<unk>", "a", "c", "b"]))
    with pytest.raises(ValueError, match=r"2 ids differ \(2: 'b' vs 'c', 3: 'c' vs 'b'\)"):
        collect_activations([base, child], [[1, 2, 3]], HOOKS, tmp_path / "s", progress=False)
    other = random_model(ModelConfig(**{**CFG.__dict__, "d_vocab": 64}), seed=1)
    with pytest.raises(ValueError, match="vocabulary of 128 ids and 'child' of 64"):
        collect_activations([random_model(CFG), other], [[1, 2, 3]], HOOKS, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()  # nothing written before the check


def test_bad_requests_say_what_to_do(pair, tmp_path):
    with pytest.raises(HookNameError, match="blocks.1.hook_resid_post"):
        collect_activations(pair, [[1, 2, 3]], ["blocks.1.hook_resid_pots"], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="not one vector per token"):
        collect_activations(pair, [[1, 2, 3]], ["blocks.1.attn.hook_pattern"], tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="leaves no tokens"):
        collect_activations(pair, [[1, 2]], HOOKS, tmp_path / "c", skip_first=2, progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an activation store"):
        collect_activations(pair, [[1, 2, 3]], HOOKS, tmp_path / "d", progress=False)
    with pytest.raises(FileNotFoundError, match="collect_activations"):
        ActivationStore(tmp_path / "d")
    store = collect_activations(pair, [[1, 2, 3, 4]], HOOKS[:1], tmp_path / "e", progress=False)
    with pytest.raises(KeyError, match="holds"):
        next(store.batches("blocks.2.hook_resid_post", 2))
    json.loads((tmp_path / "e" / "store.json").read_text())


def test_text_and_generations_on_the_embedded_model(smol_model, tmp_path):
    rows = generations(smol_model, ["What is 2 + 3?"], 8, progress=False)
    prompt = smol_model.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])
    n_prompt = len(smol_model.tokenizer.encode(prompt))
    assert rows[0][:n_prompt] == smol_model.tokenizer.encode(prompt) and n_prompt < len(rows[0]) <= n_prompt + 8
    store = collect_activations(smol_model, ["The cat sat on the mat.", *map(smol_model.to_string, rows)],
                                "blocks.12.hook_resid_post", tmp_path / "s", progress=False)
    assert store.models == ["model"] and store.sequence_tokens(0).tolist() == smol_model.tokenizer.encode("The cat sat on the mat.")
    assert store.sequence_tokens(1).tolist() == rows[0]
