"""Fuzzed GGUF files: every mutation of a tiny valid file is refused with a HookedCoTError or loads
consistently. 1,000 seeded cases here (two files: LLaMA in F32, Qwen2 in Q8_0), more under `-m slow`.

A loaded case is consistent when: the tensor table (names, types, shapes, byte offsets) is the one
the writer wrote, read by a walker written here (not hookedcot's); every weight whose bytes the
mutation did not touch equals the original bit for bit, and the rest are finite; the config passes
ModelConfig's checks and, when the metadata was not touched, equals the original (and then the
logits equal the original's bit for bit); the tokenizer fits the embedding.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import gguf
from fuzzing import Tally, mutate_bytes, one_thread, run_case
from gguf_factory import gguf_tensors, tiny_hf_model, tiny_vocab, write_gguf
from hookedcot import HookedCoT
from hookedcot.conversions.gguf import GGUF_NAMES

pytest.importorskip("transformers")

FAST_CASES, SLOW_CASES = 1000, 20000
MEMORY_EVERY = 10  # tracemalloc slows a case several-fold: every 10th case is measured
PROBE = torch.tensor([[3, 17, 41, 45, 5]])
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Walked:
    """An independent walk of a GGUF header: integer fields by kind, boundaries, tensor table."""

    fields: dict[str, list[tuple[int, int]]]
    boundaries: list[int]
    tensors: list[tuple[str, int, tuple[int, ...], int]]  # name, type, dims, absolute offset
    data_start: int
    metadata_end: int


def walk(data: bytes) -> Walked | None:
    """Parse a (little-endian, version 3) GGUF; None when it does not parse."""
    try:
        fields: dict[str, list[tuple[int, int]]] = {"count": [(8, 8), (16, 8)], "key": [], "type": [], "length": [],
                                                    "array": [], "dims": [], "tensor_type": [], "offset": []}
        pos, boundaries = 24, [4, 8, 16, 24]
        n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
        if n_tensors > 10_000 or n_kv > 10_000:
            return None
        alignment = 32

        def value(kind: int, pos: int) -> tuple[int, object]:
            if kind in _SCALAR_SIZES:
                size = _SCALAR_SIZES[kind]
                return pos + size, int.from_bytes(data[pos: pos + size], "little") if kind in (4,) else None
            if kind == 8:
                fields["length"].append((pos, 8))
                n = struct.unpack_from("<Q", data, pos)[0]
                if pos + 8 + n > len(data):
                    raise ValueError
                return pos + 8 + n, None
            if kind == 9:
                fields["array"] += [(pos, 4), (pos + 4, 8)]
                item, n = struct.unpack_from("<IQ", data, pos)
                pos += 12
                if item in _SCALAR_SIZES:
                    return pos + n * _SCALAR_SIZES[item], None
                if n > len(data):
                    raise ValueError
                for _ in range(n):
                    pos, _ = value(item, pos)
                return pos, None
            raise ValueError(kind)

        for _ in range(n_kv):
            fields["key"].append((pos, 8))
            n = struct.unpack_from("<Q", data, pos)[0]
            key = data[pos + 8: pos + 8 + n].decode()
            pos += 8 + n
            fields["type"].append((pos, 4))
            kind = struct.unpack_from("<I", data, pos)[0]
            pos, val = value(kind, pos + 4)
            if key == "general.alignment":
                alignment = val
            boundaries.append(pos)
        metadata_end = pos
        tensors = []
        for _ in range(n_tensors):
            n = struct.unpack_from("<Q", data, pos)[0]
            name = data[pos + 8: pos + 8 + n].decode()
            pos += 8 + n
            n_dims = struct.unpack_from("<I", data, pos)[0]
            fields["dims"] += [(pos, 4)] + [(pos + 4 + 8 * i, 8) for i in range(n_dims)]
            dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
            pos += 4 + 8 * n_dims
            fields["tensor_type"].append((pos, 4))
            fields["offset"].append((pos + 4, 8))
            qtype, offset = struct.unpack_from("<IQ", data, pos)
            pos += 12
            tensors.append((name, qtype, dims, offset))
            boundaries.append(pos)
        data_start = -(-pos // alignment) * alignment
        boundaries.append(data_start)
        table = [(name, qtype, dims, data_start + offset) for name, qtype, dims, offset in tensors]
        boundaries += [offset for *_, offset in table]
        return Walked(fields, boundaries, table, data_start, metadata_end)
    except (struct.error, ValueError, UnicodeDecodeError, TypeError, OverflowError):
        return None


@dataclass
class Original:
    path: Path
    data: bytes
    walked: Walked
    spans: dict[str, tuple[int, int]]  # GGUF tensor name -> (first byte, end)
    params: dict[str, torch.Tensor]
    config: object
    logits: torch.Tensor


def fuzz_vocab() -> dict:
    """tiny_vocab's keys over 52 tokens instead of ~330: the metadata readers' cost is per string,
    and a small vocabulary keeps a case near 20 ms while exercising the same code."""
    vocab = tiny_vocab()
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'Ġ")
    merges = ["t h", "th e", "Ġ the", "f o", "fo x"]
    tokens = chars + ["th", "the", "Ġthe", "fo", "fox"] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                                         "</think>", "<|中文|>"]
    n = len(tokens)
    return {**vocab, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [1] * (n - 6) + [3, 3, 3, 4, 4, 3],
            "tokenizer.ggml.bos_token_id": n - 5, "tokenizer.ggml.eos_token_id": n - 4,
            "tokenizer.ggml.padding_token_id": n - 6}


def _original(folder: Path, arch: str, qtype: gguf.GGMLQuantizationType) -> Original:
    vocab = fuzz_vocab()
    d_model = 16 if qtype == gguf.GGMLQuantizationType.F32 else 32
    model = tiny_hf_model(arch, len(vocab["tokenizer.ggml.tokens"]), d_model=d_model, d_mlp=32, n_layers=1)
    path = write_gguf(folder / f"{arch}.gguf", arch, model.config, gguf_tensors(model, arch), vocab, qtype=qtype)
    data = path.read_bytes()
    walked = walk(data)
    assert walked is not None
    sizes = {}
    ordered = sorted(walked.tensors, key=lambda t: t[3])
    for (name, _, _, start), nxt in zip(ordered, [*ordered[1:], None]):
        sizes[name] = (start, nxt[3] if nxt else len(data))
    loaded = HookedCoT.from_pretrained(str(path))
    with torch.no_grad(), one_thread():  # as the cases run: thread count can change the last bit
        logits = loaded(PROBE)
    return Original(path, data, walked, sizes, {k: v.detach().clone() for k, v in loaded.state_dict().items()},
                    loaded.cfg, logits)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> list[Original]:
    folder = tmp_path_factory.mktemp("fuzz_gguf")
    return [_original(folder, "llama", gguf.GGMLQuantizationType.F32),
            _original(folder, "qwen2", gguf.GGMLQuantizationType.Q8_0)]


def _consistency_check(orig: Original, mutated: bytes, touched: tuple[int, int]):
    def check(model: HookedCoT) -> None:
        walked = walk(mutated)
        assert walked is not None, "hookedcot loaded a file the independent walker cannot parse"
        assert walked.tensors == orig.walked.tensors, "the tensor table differs from the one written"
        metadata_touched = touched[0] < orig.walked.metadata_end
        weights_touched = False
        for ours, param in model.state_dict().items():
            assert torch.isfinite(param).all(), f"{ours} holds NaN/inf"
            if ours == "unembed.weight" and model.cfg.tie_embeddings:
                continue
            first, end = orig.spans[GGUF_NAMES.source(ours)]
            if touched[1] <= first or touched[0] >= end:
                assert torch.equal(param, orig.params[ours]), f"{ours}: bytes untouched but values changed"
            else:
                weights_touched = True
        if not metadata_touched:
            assert model.cfg == orig.config, "metadata untouched but the config changed"
        with torch.no_grad():
            logits = model(PROBE[:, PROBE[0] < model.cfg.d_vocab][:, : model.cfg.n_ctx])
        # a flipped exponent bit makes a finite but huge weight, which may overflow: only untouched weights must give finite logits
        assert weights_touched or torch.isfinite(logits).all(), "non-finite logits from the original weights"
        if not metadata_touched and not weights_touched:
            assert torch.equal(logits, orig.logits), "nothing touched but the logits changed"
        if model.tokenizer is not None:
            assert model.tokenizer.vocab_size <= model.cfg.d_vocab
            assert max(model.tokenizer.encode("the fox 42 <think>é")) < model.cfg.d_vocab
    return check


def fuzz(originals: list[Original], n: int, seed: int, folder: Path) -> Tally:
    tally = Tally("GGUF")
    rng = random.Random(seed)
    with one_thread():
        for i in range(n):
            _case(tally, originals[i % len(originals)], rng, seed, i, folder)
    return tally


def _case(tally: Tally, orig: Original, rng: random.Random, seed: int, i: int, folder: Path) -> None:
    kinds = [k for k, v in orig.walked.fields.items() if v]
    fields = orig.walked.fields[rng.choice(kinds)]  # a field kind first: token strings would crowd out the rest
    mutated, what, touched = mutate_bytes(orig.data, rng, fields, orig.walked.boundaries)
    path = folder / f"case{i % 4}.gguf"
    path.write_bytes(mutated)
    label = f"seed {seed} case {i} ({orig.path.stem}: {what})"
    run_case(tally, label, lambda: HookedCoT.from_pretrained(str(path)), _consistency_check(orig, mutated, touched),
             measure_memory=i % MEMORY_EVERY == 0)


def _assert_clean(tally: Tally, folder: Path, n: int) -> None:
    print("\n" + tally.summary())
    assert tally.cases == n
    assert not tally.escaped, f"{len(tally.escaped)} cases escaped as non-hookedcot errors:\n" + "\n".join(tally.escaped[:20])
    assert sorted(p.name for p in folder.iterdir()) == [f"case{i}.gguf" for i in range(min(n, 4))], "files left behind"


def test_the_walker_reads_what_the_writer_wrote(originals):
    for orig in originals:
        reader = gguf.GGUFReader(orig.path)
        assert [t[0] for t in orig.walked.tensors] == [t.name for t in reader.tensors]
        assert [t[3] for t in orig.walked.tensors] == [int(t.data_offset) for t in reader.tensors]
        assert orig.walked.data_start == reader.data_offset


def test_a_thousand_mutated_gguf_files_are_refused_or_load_consistently(originals, tmp_path):
    tally = fuzz(originals, FAST_CASES, seed=16, folder=tmp_path)
    _assert_clean(tally, tmp_path, FAST_CASES)
    assert tally.outcomes["loaded"] > 0 and tally.cases - tally.outcomes["loaded"] > 0


@pytest.mark.slow
def test_many_mutated_gguf_files(originals, tmp_path):
    tally = fuzz(originals, SLOW_CASES, seed=1616, folder=tmp_path)
    _assert_clean(tally, tmp_path, SLOW_CASES)


def attacker_files(orig: Original) -> dict[str, bytes]:
    """The cases issue 16 found loading or exhausting memory, as mutated copies of `orig`."""
    data, w = orig.data, orig.walked
    key_at = {}
    for (at, _), (type_at, _) in zip(w.fields["key"], w.fields["type"]):
        n = struct.unpack_from("<Q", data, at)[0]
        key_at[data[at + 8: at + 8 + n].decode()] = type_at

    def patch(at: int, raw: bytes) -> bytes:
        return data[:at] + raw + data[at + len(raw):]

    block_value = key_at[f"{orig.path.stem}.block_count"] + 4
    return {
        "tokenizer.ggml.pre retyped as an array": patch(key_at["tokenizer.ggml.pre"], struct.pack("<I", 9)),
        "block_count 2^31-1": patch(block_value, struct.pack("<I", 2**31 - 1)),
        "block_count 2^20": patch(block_value, struct.pack("<I", 2**20)),
        "tensor offset 1": patch(w.fields["offset"][1][0], struct.pack("<Q", 1)),
        "tensor offset aliasing the first": patch(w.fields["offset"][1][0], struct.pack("<Q", 0)),
        "tensor offset past the end": patch(w.fields["offset"][-1][0], struct.pack("<Q", 2**64 - 32)),
        "tensor_count one short": patch(w.fields["count"][0][0], struct.pack("<Q", len(w.tensors) - 1)),
        "kv_count 2^63": patch(w.fields["count"][1][0], struct.pack("<Q", 2**63)),
    }


def test_attacker_cases_from_the_issue_are_refused(originals, tmp_path):
    from hookedcot.conversions import ConversionError

    for orig in originals:
        for name, mutated in attacker_files(orig).items():
            path = tmp_path / "attack.gguf"
            path.write_bytes(mutated)
            with pytest.raises(ConversionError) as info:
                HookedCoT.from_pretrained(str(path))
            assert str(path) in str(info.value), name


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """Valid text would tokenize to ids past the embedding: refused at load, naming both sizes."""
    from hookedcot.conversions import ConversionError

    vocab = fuzz_vocab()
    n_tokens = len(vocab["tokenizer.ggml.tokens"])
    vocab.update({"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2})
    model = tiny_hf_model("llama", n_tokens - 10, d_model=16, d_mlp=32, n_layers=1)
    path = write_gguf(tmp_path / "small_embed.gguf", "llama", model.config, gguf_tensors(model, "llama"), vocab)
    with pytest.raises(ConversionError, match=f"tokenizer has {n_tokens} tokens .* but the embedding only {n_tokens - 10}"):
        HookedCoT.from_pretrained(str(path))
