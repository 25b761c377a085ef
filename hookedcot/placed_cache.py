"""A KV cache's buffers spread over the devices of a split model (device_map.py), layer by layer.

A `KVCache` holds keys and values as one tensor [layers, batch, kv heads, positions, d_head] on
one device: everything that builds one (generation, patching, rollouts, ...) passes
`model.device`. On a split model each layer's slice must live with its block, so the first
forward of a split model over a cache (`place_cache`) replaces the two buffers with a
`LayerStack`: one tensor per layer, each on its block's device, that answers the indexing the
cache code uses (`keys[layer, :, :, a:b]`, `keys[:, rows]`, `keys[:, 0, :, :p]`, assignment to
those, `shape`, `new_empty`, `clone`) as the stacked tensor would. The cache code itself does not
change. The buffer first allocated on the embedding's device is copied out once and freed, so
that device holds the whole cache for a moment: size caches with that in mind.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


class LayerStack:
    """[layers, ...] as one tensor per layer on its own device (module docstring)."""

    def __init__(self, parts: Sequence[Tensor]):
        self.parts = list(parts)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.parts), *self.parts[0].shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def devices(self) -> list[torch.device]:
        return [p.device for p in self.parts]

    def __getitem__(self, index: Any) -> Any:
        first, rest = _split(index)
        if isinstance(first, int):
            return self.parts[first][_on(rest, self.parts[first].device)]
        return LayerStack([p[_on(rest, p.device)] for p in self._select(first)])

    def __setitem__(self, index: Any, value: Any) -> None:
        first, rest = _split(index)
        if isinstance(first, int):
            part = self.parts[first]
            part[_on(rest, part.device)] = value.to(part.device) if isinstance(value, Tensor) else value
            return
        for i, part in zip(range(len(self.parts))[first], self._select(first)):
            v = value.parts[i] if isinstance(value, LayerStack) else value[i] if isinstance(value, Tensor) else value
            part[_on(rest, part.device)] = v.to(part.device) if isinstance(v, Tensor) else v

    def _select(self, first: slice) -> list[Tensor]:
        if first != slice(None):
            raise IndexError("a LayerStack takes one layer or every layer (':') on its first axis")
        return self.parts

    def new_empty(self, shape: Sequence[int]) -> "LayerStack":
        if shape[0] != len(self.parts):
            raise ValueError(f"a LayerStack of {len(self.parts)} layers cannot make a new one of {shape[0]}")
        return LayerStack([p.new_empty(tuple(shape[1:])) for p in self.parts])

    def clone(self) -> "LayerStack":
        return LayerStack([p.clone() for p in self.parts])

    def numel(self) -> int:
        return sum(p.numel() for p in self.parts)

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def stacked(self, device: torch.device | str = "cpu") -> Tensor:
        """The whole stack as one tensor on `device` (for inspection)."""
        return torch.stack([p.to(device) for p in self.parts])


def place_cache(past: Any, layer_devices: Sequence[torch.device]) -> None:
    """Move a cache's per-layer buffers to their blocks' devices, once (module docstring). Plain
    and shared-prefix caches are moved; a static cache (fixed-shape decode) is refused."""
    if getattr(past, "static", False):
        raise ValueError("a static KV cache (fixed-shape or compiled decode) cannot span devices; on a model "
                         "loaded with a device_map, generate with the dynamic cache: generate(..., decode='eager')")
    for name in ("keys", "values", "prefix_keys", "prefix_values"):
        buf = getattr(past, name, None)
        if isinstance(buf, Tensor) and any(buf.device != d for d in layer_devices):
            setattr(past, name, LayerStack([buf[i].to(d, copy=True) for i, d in enumerate(layer_devices)]))


def _split(index: Any) -> tuple[Any, tuple]:
    index = index if isinstance(index, tuple) else (index,)
    return index[0], index[1:]


def _on(rest: tuple, device: torch.device) -> tuple:
    """Index tensors moved to the layer's device (row selections come from the embedding's)."""
    return tuple(i.to(device) if isinstance(i, Tensor) and i.device != device else i for i in rest)
