"""Fuzzed safetensors checkpoints, single-file and sharded with an index: every mutation is
refused with a HookedCoTError or loads consistently. 1,000 seeded cases here, more under `-m slow`.

Mutations: bit flips, byte edits and truncations anywhere (weighted to the header), a corrupt
header length, and structural header edits re-serialised with a correct length: dtypes of any
JSON type, odd shapes, data_offsets that alias or overlap a neighbour, run backwards, outside the
data or are not integers, entries dropped or added, a key written twice, deep nesting; for the
sharded folder also index edits (shards that do not hold what the index says, paths out of the
folder, missing or extra entries, any JSON value) and shard corruption.

A loaded case is consistent when the `safetensors` library itself (an independent reader) loads
the same files, every weight equals its tensor bit for bit (cast to the loaded dtype), the index
(when sharded) names the shard that really holds each tensor, and the logits are finite; when the
weights' bytes are the original ones, the logits equal the original logits bit for bit.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuzzing import TINY_HF_CONFIG, Tally, deep_nest, dumps, mutate_bytes, mutate_json_object, one_thread, random_json, run_case, tiny_hf_tensors
from hookedcot import HookedCoT
from hookedcot.conversions.registry import HF_NAMES

FAST_CASES, SLOW_CASES = 1000, 20000
MEMORY_EVERY = 10
PROBE = torch.tensor([[1, 5, 9, 30, 39]])
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


class Original:
    def __init__(self, root: Path):
        self.tensors = tiny_hf_tensors()
        self.single = root / "single"
        self.single.mkdir()
        (self.single / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
        save_file(self.tensors, self.single / "model.safetensors", metadata={"format": "pt"})
        self.data = (self.single / "model.safetensors").read_bytes()
        self.header_len = struct.unpack_from("<Q", self.data)[0]
        self.header = json.loads(self.data[8: 8 + self.header_len])
        self.sharded = root / "sharded"
        self.sharded.mkdir()
        (self.sharded / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
        names = sorted(self.tensors)
        self.weight_map = {name: SHARDS[i * 2 // len(names)] for i, name in enumerate(names)}
        for shard in SHARDS:
            save_file({n: t for n, t in self.tensors.items() if self.weight_map[n] == shard}, self.sharded / shard,
                      metadata={"format": "pt"})
        self.index = {"metadata": {"total_size": 4 * sum(t.numel() for t in self.tensors.values())},
                      "weight_map": self.weight_map}
        (self.sharded / INDEX).write_text(json.dumps(self.index))
        self.shard_bytes = {s: (self.sharded / s).read_bytes() for s in SHARDS}
        model = HookedCoT.from_pretrained(str(self.single))
        with torch.no_grad(), one_thread():  # as the cases run: thread count can change the last bit
            self.logits = model(PROBE)
        self.config = model.cfg


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    return Original(tmp_path_factory.mktemp("fuzz_safetensors"))


def mutate_header(orig: Original, rng: random.Random) -> tuple[bytes, str]:
    """A structural edit of the header JSON, written back with a header length that fits it."""
    header = json.loads(json.dumps(orig.header))
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    other = header[rng.choice([n for n in names if n != name])]
    begin, end = entry["data_offsets"]
    kind = rng.choice(["dtype", "shape", "offsets", "offsets", "offsets", "drop", "add", "duplicate", "rename",
                       "metadata", "nest", "entry"])
    what = f"{kind} of {name}"
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "I8", "BOOL", "F8_E4M3", "X", "f32", "",
                                     random_json(rng)])
    elif kind == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice([[], [0], shape[::-1], [*shape, 1], [2**62, 2**62], [-1, *shape[1:]],
                                     [float(s) for s in shape], [shape], [True] * len(shape), random_json(rng)])
    elif kind == "offsets":
        ob, oe = other["data_offsets"]
        shift = rng.choice([1, 2, 4, 8, 64])
        entry["data_offsets"] = rng.choice([
            [ob, oe], [begin - shift, end - shift], [begin + shift, end + shift], [end, begin], [begin, begin],
            [begin, end + shift], [0, end - begin], [begin, 2**64], [-end, -begin], [float(begin), float(end)],
            [begin], [begin, end, end], [str(begin), str(end)], random_json(rng),
        ])
    elif kind == "drop":
        del header[name]
    elif kind == "add":
        header[name + "_copy" if rng.random() < 0.5 else "model.layers.7.mlp.up_proj.weight"] = dict(entry)
    elif kind == "rename":
        header[rng.choice(["model.layers.999999999999.mlp.up_proj.weight", "model.layers." + "9" * 5000 + ".x.weight",
                           "lm_head.bias", "", "\u0000", "model.layers.0.self_attn.q_proj.weight"])] = header.pop(name)
    elif kind == "metadata":
        header["__metadata__"] = random_json(rng)
    elif kind == "nest":
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = deep_nest(rng.choice([100, 1000, 100_000]))
    elif kind == "entry":
        header[name] = random_json(rng)
    text = dumps(header)
    if kind == "duplicate":
        text = "{" + f'"{name}": {json.dumps(other)}, ' + text[1:]
    raw = text.encode()
    raw += b" " * (-len(raw) % 8) if rng.random() < 0.5 else b""
    return struct.pack("<Q", len(raw)) + raw + orig.data[8 + orig.header_len:], what


def _digit_fields(orig: Original) -> list[tuple[int, int]]:
    header = orig.data[8: 8 + orig.header_len]
    return [(8 + i, 1) for i, c in enumerate(header) if chr(c).isdigit()]


def single_case(orig: Original, rng: random.Random, folder: Path) -> tuple[Path, str, bool]:
    """A mutated single-file checkpoint in `folder`; returns (folder, what, weight bytes touched)."""
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    data_start = 8 + orig.header_len
    if rng.random() < 0.5:
        data, what = mutate_header(orig, rng)
        touched = False
    else:
        boundaries = [0, 4, 8, data_start] + [data_start + e["data_offsets"][0] for n, e in orig.header.items()
                                              if n != "__metadata__"]
        fields = [(0, 8)] if rng.random() < 0.3 else _digit_fields(orig)
        data, what, (first, _) = mutate_bytes(orig.data, rng, fields, boundaries)
        touched = first >= data_start
    (folder / "model.safetensors").write_bytes(data)
    return folder, what, touched


def sharded_case(orig: Original, rng: random.Random, folder: Path) -> tuple[Path, str, bool]:
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    shards = dict(orig.shard_bytes)
    index_text, touched = json.dumps(orig.index), False
    kind = rng.choice(["index", "index", "weight_map", "shard"])
    if kind == "index":
        index_text, what = mutate_json_object(orig.index, rng, ["weight_map", "metadata"])
    elif kind == "weight_map":
        weight_map = dict(orig.weight_map)
        name = rng.choice(sorted(weight_map))
        change = rng.choice(["other shard", "escape", "missing file", "drop", "extra", "directory", "value"])
        if change == "other shard":
            weight_map[name] = SHARDS[1 - SHARDS.index(weight_map[name])]
        elif change == "escape":
            weight_map[name] = rng.choice(["../" + weight_map[name], "/etc/passwd", "sub/" + weight_map[name], ".", ""])
        elif change == "missing file":
            weight_map[name] = "model-00003-of-00002.safetensors"
        elif change == "drop":
            del weight_map[name]
        elif change == "extra":
            weight_map["model.layers.5.mlp.up_proj.weight"] = SHARDS[0]
        elif change == "directory":
            (folder / "adir").mkdir(exist_ok=True)
            weight_map[name] = "adir"
        else:
            weight_map[name] = random_json(rng)
        index_text, what = dumps({**orig.index, "weight_map": weight_map}), f"weight_map {change} ({name})"
    else:
        shard = rng.choice(SHARDS)
        header_len = struct.unpack_from("<Q", shards[shard])[0]
        shards[shard], what, (first, _) = mutate_bytes(shards[shard], rng, [(0, 8)], [8, 8 + header_len])
        what, touched = f"{shard}: {what}", first >= 8 + header_len
    for shard, data in shards.items():
        (folder / shard).write_bytes(data)
    (folder / INDEX).write_text(index_text)
    return folder, what, touched


def _consistency_check(folder: Path, touched: bool, orig: Original):
    def check(model: HookedCoT) -> None:
        files = sorted(folder.glob("*.safetensors"))
        single = folder / "model.safetensors"
        reference: dict[str, torch.Tensor] = {}
        holder: dict[str, str] = {}
        for file in [single] if single.is_file() else files:
            try:
                tensors = load_file(file)
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"the safetensors library refuses {file.name} ({exc}) but hookedcot loaded it")
            reference.update(tensors)
            holder.update(dict.fromkeys(tensors, file.name))
        if not single.is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            assert all(holder.get(n) == s for n, s in weight_map.items()), "the index names a shard that lacks a tensor"
        assert model.cfg.replace(model_name=orig.config.model_name) == orig.config, "config.json untouched but the config changed"
        for ours, param in model.state_dict().items():
            source = HF_NAMES.source(ours)
            assert torch.equal(param, reference[source].to(param.dtype)), f"{ours} differs from the file's {source}"
        with torch.no_grad():
            logits = model(PROBE)
        original_weights = all(torch.equal(reference[n], t) for n, t in orig.tensors.items())
        assert not original_weights or torch.isfinite(logits).all()  # edited weights may be huge, finite, and overflow
        if not touched and all(torch.equal(reference[n], t) for n, t in orig.tensors.items()):
            assert torch.equal(logits.float(), orig.logits), "the original weights but different logits"
    return check


def fuzz(orig: Original, n: int, seed: int, root: Path) -> Tally:
    tally = Tally("safetensors")
    rng = random.Random(seed)
    with one_thread():
        for i in range(n):
            folder = root / f"case{i}"
            folder.mkdir()
            make = sharded_case if i % 3 == 2 else single_case
            folder, what, touched = make(orig, rng, folder)
            label = f"seed {seed} case {i} ({make.__name__.split('_')[0]}: {what})"
            before = sorted(p.name for p in folder.iterdir())
            run_case(tally, label, lambda: HookedCoT.from_pretrained(str(folder)),
                     _consistency_check(folder, touched, orig), measure_memory=i % MEMORY_EVERY == 0)
            assert sorted(p.name for p in folder.iterdir()) == before, f"{label} left files behind"
            for p in folder.iterdir():
                p.rmdir() if p.is_dir() else p.unlink()
            folder.rmdir()
    return tally


def _assert_clean(tally: Tally, n: int) -> None:
    print("\n" + tally.summary())
    assert tally.cases == n
    assert not tally.escaped, f"{len(tally.escaped)} cases escaped as non-hookedcot errors:\n" + "\n".join(tally.escaped[:20])


def test_a_thousand_mutated_safetensors_checkpoints_are_refused_or_load_consistently(original, tmp_path):
    tally = fuzz(original, FAST_CASES, seed=16, root=tmp_path)
    _assert_clean(tally, FAST_CASES)
    assert tally.outcomes["loaded"] > 0


@pytest.mark.slow
def test_many_mutated_safetensors_checkpoints(original, tmp_path):
    _assert_clean(fuzz(original, SLOW_CASES, seed=1616, root=tmp_path), SLOW_CASES)


@pytest.mark.parametrize("edit", ["alias", "overlap", "duplicate key", "float offsets", "list dtype", "deep header"])
def test_attacker_headers_from_the_issue_are_refused(original, tmp_path, edit):
    from hookedcot.conversions import ConversionError

    header = json.loads(json.dumps(original.header))
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    text = None
    if edit == "alias":
        header[a]["data_offsets"] = header[b]["data_offsets"]
    elif edit == "overlap":
        header[a]["data_offsets"] = [o + 4 for o in header[a]["data_offsets"]]
    elif edit == "duplicate key":
        text = "{" + f'"{a}": {json.dumps(header[b])}, ' + json.dumps(header)[1:]
    elif edit == "float offsets":
        header[a]["data_offsets"] = [float(o) for o in header[a]["data_offsets"]]
    elif edit == "list dtype":
        header[a]["dtype"] = []
    else:
        text = json.dumps(header)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    raw = (text or json.dumps(header)).encode()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + original.data[8 + original.header_len:])
    with pytest.raises(ConversionError, match="model.safetensors"):
        HookedCoT.from_pretrained(str(folder))


@pytest.mark.parametrize("shard", ["a" * 1000, "nul\u0000byte", "..", ""], ids=["name too long", "NUL", "dotdot", "empty"])
def test_index_entries_the_os_cannot_open_are_refused(original, tmp_path, shard):
    """Found by the slow fuzz: a 1,000-character shard name made Path.is_file raise OSError."""
    from hookedcot.conversions import ConversionError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    for name, data in original.shard_bytes.items():
        (folder / name).write_bytes(data)
    name = sorted(original.weight_map)[0]
    (folder / INDEX).write_text(json.dumps({**original.index, "weight_map": {**original.weight_map, name: shard}}))
    with pytest.raises(ConversionError, match=INDEX):
        HookedCoT.from_pretrained(str(folder))
