"""A preallocated key/value cache: one buffer per layer, written in place, never reallocated.

Generation writes each new position's keys and values at `length` and attends over the prefix;
patching sweeps reuse a run's prefix keys/values so only positions from the patch on are recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hookedcot.config import ModelConfig


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (cfg.n_layers, batch, cfg.n_key_value_heads, max_len, cfg.d_head)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions already stored (the same for every layer between forwards)

    def write(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store `key`/`value` [b g p k] after the cached prefix; return prefix + new, [b g s k]."""
        end = self.length + key.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions but {end} are needed; "
                "allocate a larger cache (max_len) or generate fewer tokens"
            )
        self.keys[layer, :, :, self.length : end] = key
        self.values[layer, :, :, self.length : end] = value
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the buffers are reused)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def select_rows(self, rows: Tensor) -> "KVCache":
        """A new cache holding the given batch rows (e.g. one row repeated for a batched sweep)."""
        out = KVCache.__new__(KVCache)
        out.keys = self.keys[:, rows].clone()
        out.values = self.values[:, rows].clone()
        out.max_len, out.length = self.max_len, self.length
        return out
