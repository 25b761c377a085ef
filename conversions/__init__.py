"""Per-family weight conversion: a source checkpoint -> (ModelConfig, named tensors).

A family is a config translation plus a table from source tensor names to hookedcot's own
parameter names with the few transforms needed. The model never learns where its weights came
from: `hookedcot.loading` takes a `ConvertedCheckpoint` and fills a meta-device model from it.

hookedcot's parameter names (shapes in torch's [out, in] Linear layout):
    embed.weight                        [d_vocab, d_model]
    blocks.{L}.ln1.weight / ln2.weight  [d_model]
    blocks.{L}.attn.q_proj.weight       [n_heads * d_head, d_model]      (+ .bias if qkv_bias)
    blocks.{L}.attn.k_proj.weight       [n_kv_heads * d_head, d_model]   (+ .bias if qkv_bias)
    blocks.{L}.attn.v_proj.weight       [n_kv_heads * d_head, d_model]   (+ .bias if qkv_bias)
    blocks.{L}.attn.o_proj.weight       [d_model, n_heads * d_head]      (+ .bias if o_bias)
    blocks.{L}.mlp.gate_proj.weight     [d_mlp, d_model]                 (+ .bias if mlp_bias)
    blocks.{L}.mlp.up_proj.weight       [d_mlp, d_model]                 (+ .bias if mlp_bias)
    blocks.{L}.mlp.down_proj.weight     [d_model, d_mlp]                 (+ .bias if mlp_bias)
    ln_final.weight                     [d_model]
    unembed.weight                      [d_vocab, d_model]   (absent when tie_embeddings)
"""

from __future__ import annotations

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


@dataclass
class ConvertedCheckpoint:
    config: ModelConfig
    tensors: dict[str, TensorRef]  # keyed by hookedcot parameter name
    tokenizer: Any = None  # a hookedcot.tokenizer.Tokenizer, when the source carries one
    source_dtype: torch.dtype | None = None  # the checkpoint's own dtype, the default target
    extra: dict[str, Any] = field(default_factory=dict)


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
