"""Per-family weight conversion: a source checkpoint -> (ModelConfig, named tensors).

A family is a config translation plus a rule from source tensor names to hookedcot's parameter
names, with the few transforms needed. The model never learns where its weights came from:
`hookedcot.loading` builds it on the meta device, checks a `ConvertedCheckpoint` against that
model's parameters (the one list of them) and fills it in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hookedcot.config import ModelConfig


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
        match = re.fullmatch(re.escape(self.layer).replace(r"\{\}", r"(\d+)") + r"\.(.+)", stem)
        if match and match[2] in self.parts:
            return f"blocks.{int(match[1])}.{self.parts[match[2]]}.{suffix}"
        return None

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


class ConversionError(ValueError):
    """A checkpoint cannot be converted: unsupported architecture, bad tensors, corrupt file."""


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
