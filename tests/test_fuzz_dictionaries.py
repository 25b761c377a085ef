"""Fuzzed dictionary and lens files: SAEs (SAELens and sparsify folders), crosscoders, tuned lenses
and activation stores. Every mutation of a tiny valid folder is refused with a HookedCoTError or
loads consistently; 1,000 seeded cases per loader here, more under `-m slow`.

Mutations (one file of the folder per case): the JSON config / manifest edited structurally at any
depth (a value replaced by any JSON type: strings for numbers, 0, negatives, NaN, inf, huge ints,
bools, lists, objects, 100,000-deep nesting; keys dropped, added or written twice; byte edits and
truncation of the text); the safetensors file's bytes (bit flips, corrupt header length,
truncation, insertions, deletions); its header re-serialised with a correct length but other
dtypes, shapes, offsets, dropped / renamed / extra tensors; its tensors' values replaced by NaN,
inf or huge numbers.

A loaded case is consistent when every tensor is floating point and finite, the shapes agree with
the config (d_in, d_sae / num_latents, models, d_latent, d_model, num_hidden_layers, the store's
d and n_tokens), the settings have their types (k a positive int, names strings), and the object
runs on a small input: encode and decode (outputs finite unless the weights are huge), every
translator, every shard loaded with its statistics and every sequence's tokens.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

from fuzz_dictionary_files import D_IN, Folder
from fuzzing import Tally, one_thread, run_case
from hookedcot import ModelConfig
from hookedcot.dictionaries import SAE, ActivationStore, CrossCoder, TunedLens, collect_activations, load_sae
from model_factory import random_model

FAST_CASES, SLOW_CASES = 1000, 10000
MEMORY_EVERY = 10
D_SAE, HOOK = 16, "blocks.0.hook_resid_post"
HUGE = 1e6  # weights above this may overflow a matmul to inf: then only shapes are checked


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        assert t.is_floating_point() and torch.isfinite(t).all(), f"{name} is not finite floating point"


def _huge(tensors: Any) -> bool:
    return any(float(t.detach().abs().max()) > HUGE for t in tensors if t is not None and t.numel())


# ------------------------------------------------------------------------------------ SAEs
def _check_sae(sae: Any, cfg_of: Callable[[], dict]) -> None:
    saes = list(sae.values()) if isinstance(sae, dict) else [sae]
    assert saes, "an empty dict of SAEs"
    cfg = cfg_of()
    for s in saes:
        assert isinstance(s, SAE)
        _finite({n: t for n, t in s.named_parameters()})
        assert s.W_enc.shape == (s.d_in, s.d_sae) and s.W_dec.shape == (s.d_sae, s.d_in)
        for key, got in (("d_in", s.d_in), ("d_sae", s.d_sae), ("num_latents", s.d_sae)):
            if cfg.get(key) is not None:
                assert cfg[key] == got, f"cfg {key}={cfg[key]!r} but the weights say {got}"
        assert s.hook_name is None or isinstance(s.hook_name, str)
        assert s.k is None or (type(s.k) is int and s.k > 0), f"k={s.k!r}"
        x = torch.randn(3, s.d_in)
        with torch.no_grad():
            f, y = s.encode(x), s(x)
        assert f.shape == (3, s.d_sae) and y.shape == (3, s.d_in)
        if not _huge(s.parameters()):
            assert torch.isfinite(y).all(), "finite weights of moderate size gave a non-finite reconstruction"


def _saelens_folders(root: Path) -> list[Folder]:
    g = torch.Generator().manual_seed(0)
    out = []
    for arch, cfg in (("jumprelu", {"d_in": D_IN, "d_sae": D_SAE, "architecture": "jumprelu",
                                    "metadata": {"hook_name": HOOK}, "apply_b_dec_to_input": True}),
                      ("topk", {"d_in": D_IN, "d_sae": D_SAE, "architecture": "topk", "k": 4, "metadata": {"hook_name": HOOK}}),
                      ("old", {"d_in": D_IN, "d_sae": D_SAE, "hook_point": HOOK, "activation_fn_str": "topk",
                               "activation_fn_kwargs": {"k": 3}})):
        w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
             "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
        if arch == "jumprelu":
            w["threshold"] = torch.rand(D_SAE, generator=g)
        src = root / f"src_{arch}"
        src.mkdir()
        save_file(w, src / "sae_weights.safetensors")
        (src / "cfg.json").write_text(json.dumps(cfg))
        load_sae(src)  # the original is valid
        out.append(Folder(root / "case", _snapshot(src)))
    return out


def _sparsify_folder(root: Path) -> Folder:
    g = torch.Generator().manual_seed(1)
    src = root / "src_sparsify"
    for module, transposed in (("layers.1", False), ("layers.0.mlp", True)):
        (src / module).mkdir(parents=True)
        dec = torch.randn(D_SAE, D_IN, generator=g)
        save_file({"encoder.weight": torch.randn(D_SAE, D_IN, generator=g), "encoder.bias": torch.randn(D_SAE, generator=g),
                   "W_dec": dec.T.contiguous() if transposed else dec, "b_dec": torch.randn(D_IN, generator=g)},
                  src / module / "sae.safetensors")
        (src / module / "cfg.json").write_text(json.dumps({"k": 4, "num_latents": D_SAE, "expansion_factor": 2}))
    assert len(load_sae(src)) == 2
    return Folder(root / "case", _snapshot(src))


def _cfgs(folder: Path) -> Callable[[], dict]:
    """The (first readable) cfg.json of the case folder, for the shape checks; {} when none parses."""
    def read() -> dict:
        for p in sorted(folder.rglob("cfg.json")):
            try:
                cfg = json.loads(p.read_text())
                if isinstance(cfg, dict) and (folder / "sae_weights.safetensors").exists():
                    return cfg
            except ValueError:
                pass
        return {}
    return read


def _fuzz(label: str, folders: "list[Folder] | Folder", load: Callable[[Path], Any],
          check_for: Callable[[Path], Callable[[Any], None]], n: int, seed: int) -> Tally:
    """`n` seeded mutations of a loader's folder (one picked at random per case from a list;
    a single folder is used as it is), each loaded and checked."""
    tally = Tally(label)
    rng = random.Random(seed)
    with one_thread():
        for i in range(n):
            folder = rng.choice(folders) if isinstance(folders, list) else folders
            what = folder.case(rng)
            run_case(tally, f"seed {seed} case {i} ({what})", lambda f=folder.root: load(f), check_for(folder.root),
                     measure_memory=i % MEMORY_EVERY == 0)
    return tally


def fuzz_sae(root: Path, n: int, seed: int, sparsify: bool) -> Tally:
    if sparsify:
        return _fuzz("load_sae (sparsify)", [_sparsify_folder(root)], load_sae, _check_sae_sparsify, n, seed)
    return _fuzz("load_sae (SAELens)", _saelens_folders(root), load_sae,
                 lambda f: (lambda s: _check_sae(s, _cfgs(f))), n, seed)


def _check_sae_sparsify(folder: Path) -> Callable[[Any], None]:
    def check(saes: Any) -> None:
        assert isinstance(saes, dict) and len(saes) == 2, "a two-module folder gave other than two SAEs"
        names = {"blocks.1.hook_resid_post": "layers.1", "blocks.0.hook_mlp_out": "layers.0.mlp"}
        assert set(saes) == set(names)
        for hook, sae in saes.items():
            cfg = json.loads((folder / names[hook] / "cfg.json").read_text())
            _check_sae(sae, lambda c=cfg: c)
            assert (sae.k is None) == (cfg.get("k") is None)
    return check


# ------------------------------------------------------------------------------------ crosscoders
def _crosscoder_folder(root: Path) -> Folder:
    src = CrossCoder.init(D_IN, D_SAE, ["base", "chat"], seed=0, architecture="batchtopk", k=3, threshold=0.25,
                          hook_name=HOOK, l1_coeff=None).save(root / "src_crosscoder")
    CrossCoder.load(src)
    return Folder(root / "case", _snapshot(src))


def _check_crosscoder(folder: Path) -> Callable[[Any], None]:
    def check(coder: Any) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        assert isinstance(coder, CrossCoder)
        assert (coder.n_models, coder.d_in, coder.d_latent) == (len(cfg["models"]), cfg["d_in"], cfg["d_latent"])
        assert coder.models == cfg["models"] and len(set(coder.models)) == coder.n_models
        _finite({**dict(coder.named_parameters()), "input_scale": coder.input_scale})
        assert coder.k is None or (type(coder.k) is int and coder.k > 0)
        assert coder.threshold is None or (type(coder.threshold) in (int, float) and math.isfinite(coder.threshold))
        x = torch.randn(5, coder.n_models, coder.d_in)
        with torch.no_grad():
            f = coder.encode(x)
            y = coder.decode(f)
        assert f.shape == (5, coder.d_latent) and y.shape == x.shape
        if not _huge([*coder.parameters(), coder.input_scale]):
            assert torch.isfinite(y).all()
    return check


def fuzz_crosscoder(root: Path, n: int, seed: int) -> Tally:
    return _fuzz("CrossCoder.load", _crosscoder_folder(root), CrossCoder.load, _check_crosscoder, n, seed)


# ------------------------------------------------------------------------------------ tuned lens
def _lens_folders(root: Path) -> list[Folder]:
    out = []
    for fmt in ("safetensors", "tuned-lens"):
        lens = TunedLens(D_IN, 3, bias=True, base_model_name_or_path="tiny")
        with torch.no_grad():
            for p in lens.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        src = lens.save(root / f"src_lens_{fmt}", format=fmt)
        TunedLens.load(src)
        out.append(Folder(root / "case", _snapshot(src)))
    return out


def _check_lens(folder: Path) -> Callable[[Any], None]:
    def check(lens: Any) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        assert isinstance(lens, TunedLens)
        assert lens.n_layers == cfg["num_hidden_layers"] and lens.config["d_model"] == cfg["d_model"]
        _finite(dict(lens.named_parameters()))
        x = torch.randn(2, 4, cfg["d_model"])
        for layer in range(lens.n_layers):
            y = lens.transform(x, layer)
            assert y.shape == x.shape
            if not _huge(lens.parameters()):
                assert torch.isfinite(y).all()
    return check


def fuzz_lens(root: Path, n: int, seed: int) -> Tally:
    return _fuzz("TunedLens.load", _lens_folders(root), TunedLens.load, _check_lens, n, seed)


# ------------------------------------------------------------------------------------ activation store
STORE_CFG = ModelConfig(n_layers=1, d_model=D_IN, n_heads=2, n_key_value_heads=1, d_head=4, d_mlp=16, d_vocab=32,
                        norm_eps=1e-6, model_name="tiny")


def _store_folder(root: Path) -> Folder:
    models = {"base": random_model(STORE_CFG, seed=0), "chat": random_model(STORE_CFG, seed=1)}
    seqs = [[1, 5, 9, 3], [2, 7, 7, 30, 11], [4, 4, 8]]
    src = root / "src_store"
    store = collect_activations(models, seqs, [HOOK, "blocks.0.hook_mlp_out"], src, batch_size=1, shard_tokens=4,
                                progress=False)
    assert store.complete and len(store.shards) >= 2
    return Folder(root / "case", _snapshot(src))


def _open_and_read(folder: Path) -> tuple[ActivationStore, list, list]:
    """Opening is not enough: a store is used by reading every shard, its statistics and tokens."""
    store = ActivationStore(folder)
    shards = [(hook, store.load_shard(i, hook)) for i in range(len(store.shards)) for hook in store.hook_names]
    seqs = [store.sequence_tokens(s) for s in range(store.manifest["n_sequences"])]
    for hook in store.hook_names:
        store.scale(hook)
    return store, shards, seqs


def _check_store(result: tuple[ActivationStore, list, list]) -> None:
    store, shards, seqs = result
    assert store.n_tokens == sum(s["n_tokens"] for s in store.shards)
    assert sum(len(b.tokens) for _, b in shards) == store.n_tokens * len(store.hook_names)
    for hook, batch in shards:
        n = len(batch.tokens)
        assert batch.acts.shape == (n, len(store.models), store.d(hook))
        assert torch.isfinite(batch.acts).all()
        assert batch.positions.shape == batch.sequences.shape == (n,)
    for hook in store.hook_names:
        scale = store.scale(hook)
        assert scale.shape == (len(store.models),) and torch.isfinite(scale).all() and (scale > 0).all()
        for stat in store.stats(hook).values():
            assert stat["mean"].shape == (store.d(hook),) and torch.isfinite(stat["mean"]).all()
    assert all(s.dim() == 1 and not s.is_floating_point() for s in seqs)


def fuzz_store(root: Path, n: int, seed: int) -> Tally:
    return _fuzz("ActivationStore (open + read)", _store_folder(root), _open_and_read, lambda f: _check_store, n, seed)


# ------------------------------------------------------------------------------------ the tests
LOADERS = {
    "saelens": lambda root, n, seed: fuzz_sae(root, n, seed, sparsify=False),
    "sparsify": lambda root, n, seed: fuzz_sae(root, n, seed, sparsify=True),
    "crosscoder": fuzz_crosscoder,
    "tuned_lens": fuzz_lens,
    "store": fuzz_store,
}


def _assert_clean(tally: Tally, n: int) -> None:
    print("\n" + tally.summary())
    assert tally.cases == n
    assert not tally.escaped, f"{len(tally.escaped)} cases escaped as non-hookedcot errors:\n" + "\n".join(tally.escaped[:20])


@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_thousand_mutated_files_are_refused_or_load_consistently(tmp_path, loader):
    tally = LOADERS[loader](tmp_path, FAST_CASES, 16)
    _assert_clean(tally, FAST_CASES)
    assert tally.outcomes["loaded"] > 0, "no mutation loaded: the consistency check never ran"
    assert sum(n for k, n in tally.outcomes.items() if k.startswith("refused")) > FAST_CASES // 4


@pytest.mark.slow
@pytest.mark.parametrize("loader", list(LOADERS))
def test_many_mutated_files(tmp_path, loader):
    _assert_clean(LOADERS[loader](tmp_path, SLOW_CASES, 1616), SLOW_CASES)
