"""Per-family weight conversion: a source checkpoint -> (ModelConfig, named tensors).

A family is a config translation plus a rule from source tensor names to hookedcot's parameter
names, with the few transforms needed. The model never learns where its weights came from:
`hookedcot.loading` builds it on the meta device, checks a `ConvertedCheckpoint` against that
model's parameters (the one list of them) and fills it in place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hookedcot.config import ModelConfig
from hookedcot.errors import HookedCoTError


@dataclass
class TensorRef:
    """One tensor of a checkpoint, not yet read: its final shape and how to read it.

    `load(dtype)` reads (and transforms/dequantises) the tensor and returns it in `dtype`;
    it is called once per tensor, so at most one source tensor is in flight at a time."""

    source_name: str
    shape: tuple[int, ...]
    load: Callable[[torch.dtype], torch.Tensor]
    file: str = ""  # the file holding it, when a checkpoint has several (for error messages)


@dataclass(frozen=True)
class TensorNames:
    """A format's tensor names <-> hookedcot's parameter names, by rule rather than by list.

    Whole-model tensors map by stem (`model.embed_tokens` -> `embed`), layer tensors by the part
    after the layer prefix (`model.layers.3.self_attn.q_proj` -> `blocks.3.attn.q_proj`); the
    `.weight` / `.bias` suffix carries over. Which names a model really has is the model's say."""

    whole: dict[str, str]  # source stem -> our stem
    layer: str  # the source's layer prefix, "{}" standing for the index: "model.layers.{}"
    parts: dict[str, str]  # source part -> our part, inside a layer

    def ours(self, name: str) -> str | None:
        """Our name for a source tensor, or None when no rule fits it."""
        stem, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            return None
        if stem in self.whole:
            return f"{self.whole[stem]}.{suffix}"
        match = self._layer_match(stem)
        if match and match[2] in self.parts:
            return f"blocks.{int(match[1])}.{self.parts[match[2]]}.{suffix}"
        return None

    def _layer_match(self, stem: str) -> re.Match | None:
        # at most 9 digits: an index from an untrusted file must not be a 5,000-digit int()
        return re.fullmatch(re.escape(self.layer).replace(r"\{\}", r"(\d{1,9})") + r"\.(.+)", stem)

    def layer_index(self, name: str) -> int | None:
        """The layer a source tensor name belongs to, or None for whole-model tensors."""
        match = self._layer_match(name.rpartition(".")[0])
        return int(match[1]) if match else None

    def source(self, ours: str) -> str:
        """The source's name for one of our parameters (to name a missing tensor)."""
        stem, _, suffix = ours.rpartition(".")
        whole = {v: k for k, v in self.whole.items()}
        if stem in whole:
            return f"{whole[stem]}.{suffix}"
        _, layer, part = stem.split(".", 2)  # blocks.{L}.{part}
        parts = {v: k for k, v in self.parts.items()}
        return f"{self.layer.format(layer)}.{parts[part]}.{suffix}"


@dataclass(frozen=True)
class SourceFormat:
    """What the tensor check needs to word its errors for one source format."""

    names: TensorNames
    shapes_from: str  # what the expected shapes follow from: "the config", "the metadata"
    fix: str  # what to do when the tensors do not fit
    unexpected_hint: Callable[[list[str], ModelConfig], str] = lambda names, cfg: ""


@dataclass
class ConvertedCheckpoint:
    config: ModelConfig
    tensors: dict[str, TensorRef]  # keyed by hookedcot parameter name, one per source tensor a rule names
    format: SourceFormat
    unmapped: list[str] = field(default_factory=list)  # source tensors no rule names: unexpected
    tokenizer: Any = None  # a hookedcot.tokenizer.Tokenizer, when the source carries one
    source_dtype: torch.dtype | None = None  # the checkpoint's own dtype, the default target


class ConversionError(HookedCoTError, ValueError):
    """A checkpoint cannot be converted: unsupported architecture, bad tensors, corrupt file."""


class CheckpointNotFoundError(ConversionError, FileNotFoundError):
    """The name given to from_pretrained is no file, folder, hub id or embedded model."""


def check_layer_count(cfg: ModelConfig, names: Any, rules: TensorNames, key: str, source: str | Path) -> None:
    """Refuse a layer count the file's tensors cannot back, before a model of that many layers is
    built: the count comes from the file, and 2^31 layers of meta tensors is an out-of-memory
    crash, not a mismatch report. (Which tensors are missing inside the layers that exist is the
    later, complete check's job.)"""
    layers = {rules.layer_index(name) for name in names} - {None}
    if cfg.n_layers > len(layers):
        raise ConversionError(
            f"{source}: {key}={cfg.n_layers}, but the file holds tensors for {len(layers)} layers; the config and the "
            "weights do not belong together (or the file is corrupt) - re-download it"
        )


def check_tokenizer_fits(tokenizer: Any, cfg: ModelConfig, source: str) -> None:
    """A tokenizer whose ids (or stop ids) run past the embedding would make valid text index
    outside it, or generation wait for a token that cannot come."""
    if tokenizer is None:
        return
    ids = tokenizer.backend.get_vocab(with_added_tokens=True).values()
    largest = max(ids, default=-1)
    if largest >= cfg.d_vocab:
        raise ConversionError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens (ids up to {largest}) but the embedding only "
            f"{cfg.d_vocab} rows; the tokenizer files and the weights do not belong together - re-download the checkpoint"
        )
    stops = [i for i in tokenizer.eos_token_ids if not 0 <= i < cfg.d_vocab]
    if stops:
        raise ConversionError(f"{source}: stop token ids {stops} (generation_config.json / tokenizer metadata) lie "
                              f"outside the embedding's {cfg.d_vocab} rows")


def check_finite(tensor: torch.Tensor, name: str, where: str, chunk: int = 1 << 20) -> None:
    """Refuse NaN or infinite weights: no trained model holds them, and they would reach the
    logits of every prompt as NaN with no hint why. Checked in chunks (isfinite makes a bool copy)."""
    if not tensor.is_floating_point() or tensor.element_size() == 1:
        return  # integers are always finite; float8 has no isfinite
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        if not bool(torch.isfinite(flat[start : start + chunk]).all()):
            raise ConversionError(
                f"{where}: tensor {name!r} holds NaN or infinite values (in the file, or after conversion to "
                f"{tensor.dtype}); a corrupt file - re-download it - or weights too large for {tensor.dtype} - load "
                "with dtype='float32'"
            )


def read_into(file: Path, offset: int, out: Any, name: str) -> None:
    """Fill the byte buffer `out` from `file` at `offset`, or say the file is too short.

    Both formats read their tensors this way rather than through a memory map: mapped pages the
    conversion touches would count as the process's memory until the map is closed."""
    view, done = memoryview(out).cast("B"), 0  # bytes, whatever the buffer's shape
    try:
        with open(file, "rb", buffering=0) as f:
            f.seek(offset)
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    break
                done += n
    except OSError as err:
        raise ConversionError(f"could not read tensor {name!r} from {file}: {err}") from err
    if done != len(view):
        raise ConversionError(f"{file} ended while reading tensor {name!r}; the file is truncated - re-download it")


MAX_JSON_BYTES = 100_000_000  # config, index and tokenizer JSON files are far smaller; safetensors' header limit
MAX_JSON_DEPTH = 64  # real configs nest 3 deep


def read_json_file(path: Path, error: type[Exception] = ConversionError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file from a checkpoint, parsed as untrusted data (`parse_json`), or `error` saying
    what is wrong; a file larger than `max_bytes` is refused before it is read."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path} is {size} bytes, more than the {max_bytes} a JSON file here may have; it is not a "
                        "checkpoint's JSON file - re-download it")
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"could not read {path}: {err}") from err
    return parse_json(raw, str(path), error)


def parse_json(raw: bytes, where: str, error: type[Exception] = ConversionError) -> Any:
    """JSON from an untrusted file, stricter than `json.loads`: a key repeated inside one object is
    refused (json keeps the last silently, so two readers could see two different configs), and
    nesting past MAX_JSON_DEPTH is refused as corrupt rather than escaping as RecursionError here
    or in code that later walks the result recursively (comparisons, repr in messages)."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
        if _depth(data) > MAX_JSON_DEPTH:
            raise RecursionError
        return data
    except _DuplicateKey as err:
        raise error(f"{where} has the key {err.args[0]!r} twice in one object; which one counts is ambiguous - "
                    "re-download or fix the file") from None
    except RecursionError:
        raise error(f"{where} nests JSON objects or arrays more than {MAX_JSON_DEPTH} deep; the file is corrupt - "
                    "re-download it") from None
    except ValueError as err:  # bad JSON or bad UTF-8
        raise error(f"{where} is not valid JSON ({type(err).__name__}: {err}); re-download or fix it") from err


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return out


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
