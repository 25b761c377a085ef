"""Fuzzed config.json: every mutation of a tiny checkpoint's config is refused with a
HookedCoTError or loads consistently. 1,000 seeded cases here, more under `-m slow`.

Mutations (fuzzing.mutate_json_object): any key's value replaced by a value of any JSON type
(strings for numbers, 0, negatives, NaN, inf, huge ints, bools, lists, objects, 100,000-deep
nesting), the same inside rope_scaling, keys dropped or added, a key written twice, byte edits of
the text, truncation. The weights stay the original ones.

A loaded case is consistent when: the text is strict JSON with no repeated key; the config holds
what the JSON says (eps, tie, ids read as written, no coercion of strings or bools); every size is
a positive int, eps and rope_theta finite and positive, rope factors finite and positive, ids
inside the vocabulary; the logits are finite; and when no key that changes the math moved, the
logits equal the original logits bit for bit.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fuzzing import TINY_HF_CONFIG, Tally, mutate_json_object, one_thread, run_case, tiny_hf_tensors
from hookedcot import HookedCoT
from hookedcot.conversions.hf_config import HARMLESS_KEYS

FAST_CASES, SLOW_CASES = 1000, 20000
MEMORY_EVERY = 10
PROBE = torch.tensor([[1, 5, 9, 30, 39]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("fuzz_config")
    save_file(tiny_hf_tensors(), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    with torch.no_grad(), one_thread():
        logits = HookedCoT.from_pretrained(str(folder))(PROBE)
    return folder, logits


def _strict(text: str) -> dict:
    def no_repeats(pairs):
        assert len({k for k, _ in pairs}) == len(pairs), "a repeated key was accepted"
        return dict(pairs)
    return json.loads(text, object_pairs_hook=no_repeats)


def _math(cfg: dict) -> dict:
    """The keys that can change the forward pass (everything but bookkeeping and generation)."""
    return {k: v for k, v in cfg.items() if k not in HARMLESS_KEYS}


def _consistency_check(text: str, original_logits: torch.Tensor):
    def check(model: HookedCoT) -> None:
        cfg, source = model.cfg, _strict(text)
        for name in ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(cfg, name)
            assert type(value) is int and value > 0, f"{name}={value!r}"
        for name in ("norm_eps", "rope_theta"):
            value = getattr(cfg, name)
            assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{name}={value!r}"
        tie = source.get("tie_word_embeddings")
        assert type(cfg.tie_embeddings) is bool and cfg.tie_embeddings == (False if tie is None else tie)  # llama default
        if source.get("rms_norm_eps") is not None:
            assert cfg.norm_eps == source["rms_norm_eps"] and type(source["rms_norm_eps"]) in (int, float)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(cfg, key)
            for i in ids if isinstance(ids, list) else [ids]:
                assert i is None or (type(i) is int and 0 <= i < cfg.d_vocab), f"{key}={ids!r}"
        for key, value in (cfg.rope_scaling or {}).items():
            if key != "rope_type":
                assert type(value) in (int, float) and math.isfinite(value) and value > 0, f"rope {key}={value!r}"
        assert cfg.n_layers <= TINY_HF_CONFIG["num_hidden_layers"]
        with torch.no_grad():
            logits = model(PROBE[:, PROBE[0] < cfg.d_vocab][:, : cfg.n_ctx])
        assert torch.isfinite(logits).all(), "non-finite logits"
        if _math(source) == _math(TINY_HF_CONFIG):
            assert torch.equal(logits, original_logits), "no key that changes the math moved, yet the logits did"
    return check


def fuzz(checkpoint: tuple[Path, torch.Tensor], n: int, seed: int) -> Tally:
    folder, logits = checkpoint
    tally = Tally("config.json")
    rng = random.Random(seed)
    keys = list(TINY_HF_CONFIG)
    files = sorted(p.name for p in folder.iterdir())
    with one_thread():
        for i in range(n):
            text, what = mutate_json_object(TINY_HF_CONFIG, rng, keys)
            (folder / "config.json").write_text(text)
            run_case(tally, f"seed {seed} case {i} ({what})", lambda: HookedCoT.from_pretrained(str(folder)),
                     _consistency_check(text, logits), measure_memory=i % MEMORY_EVERY == 0)
            assert sorted(p.name for p in folder.iterdir()) == files, f"case {i} left files behind"
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    return tally


def _assert_clean(tally: Tally, n: int) -> None:
    print("\n" + tally.summary())
    assert tally.cases == n
    assert not tally.escaped, f"{len(tally.escaped)} cases escaped as non-hookedcot errors:\n" + "\n".join(tally.escaped[:20])


def test_a_thousand_mutated_configs_are_refused_or_load_consistently(checkpoint):
    tally = fuzz(checkpoint, FAST_CASES, seed=16)
    _assert_clean(tally, FAST_CASES)
    assert tally.outcomes["loaded"] > 0


@pytest.mark.slow
def test_many_mutated_configs(checkpoint):
    _assert_clean(fuzz(checkpoint, SLOW_CASES, seed=1616), SLOW_CASES)


ATTACKER_VALUES = [
    ("architectures", True), ("rope_scaling", {**TINY_HF_CONFIG["rope_scaling"], "low_freq_factor": 0}),
    ("num_attention_heads", 0), ("rms_norm_eps", "1e-5"), ("rms_norm_eps", 0), ("rms_norm_eps", math.nan),
    ("rms_norm_eps", math.inf), ("rms_norm_eps", True), ("head_dim", "8"), ("_name_or_path", 5),
    ("rope_scaling", {**TINY_HF_CONFIG["rope_scaling"], "factor": -1}), ("tie_word_embeddings", "false"),
    ("tie_word_embeddings", 1), ("bos_token_id", 40), ("eos_token_id", [2, "3"]), ("max_position_embeddings", "4096"),
    ("num_hidden_layers", 10**6), ("num_hidden_layers", 2**31 - 1), ("rope_theta", "1e4"),
]  # the values issue 16 found loading or crashing


@pytest.mark.parametrize("key, value", ATTACKER_VALUES)
def test_attacker_values_from_the_issue_are_refused(checkpoint, tmp_path, key, value):
    from hookedcot.config import ConfigError
    from hookedcot.conversions import ConversionError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(checkpoint[0] / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**TINY_HF_CONFIG, key: value}))
    with pytest.raises((ConfigError, ConversionError), match=key if key != "rope_scaling" else "rope"):
        HookedCoT.from_pretrained(str(folder))


def test_a_config_nested_100000_deep_is_refused(checkpoint, tmp_path):
    from hookedcot.conversions import ConversionError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(checkpoint[0] / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConversionError, match="deep"):
        HookedCoT.from_pretrained(str(folder))
