"""A preallocated key/value cache: one buffer per layer, written in place, never reallocated.

Generation writes each new position's keys and values at `length` and attends over the prefix;
patching sweeps reuse a run's prefix keys/values so only positions from the patch on are recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hookedcot.config import ModelConfig


class KVCache:
    shared_prefix = False  # see SharedPrefixKVCache

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


class SharedPrefixKVCache(KVCache):
    """Rows that all continue one prefix (rollouts): the prefix's keys/values are held once,
    [layers, g, P, d_head], and each row has its own buffer for the positions after it. Attention
    reads the prefix once per step for every row (`Attention._shared_prefix`) instead of each row
    reading its own copy. `length` counts prefix + new positions, as in KVCache; `keys`/`values`
    hold the new positions only (rows can be compacted in place as in KVCache).

    >>> prefix = KVCache(cfg, 1, 256, torch.float32, "cpu"); model(tokens, past_kv=prefix)  # doctest: +SKIP
    >>> cache = SharedPrefixKVCache(prefix, rows=16, max_new=64)  # doctest: +SKIP
    """

    shared_prefix = True

    def __init__(self, prefix: KVCache, rows: int, max_new: int):
        if prefix.keys.shape[1] != 1:
            raise ValueError(f"a shared prefix is one row; this cache holds {prefix.keys.shape[1]} rows")
        p = prefix.length
        self.prefix_keys = prefix.keys[:, 0, :, :p]  # layers g P k, a view: the prefix cache is only read
        self.prefix_values = prefix.values[:, 0, :, :p]
        n_layers, g, _, k = self.prefix_keys.shape
        shape = (n_layers, rows, g, max_new, k)
        self.keys = prefix.keys.new_empty(shape)
        self.values = prefix.values.new_empty(shape)
        self.prefix_len, self.max_len, self.length = p, p + max_new, p

    def write_own(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store `key`/`value` [b g n k]; return every row's positions after the prefix, [b g s k]."""
        start = self.length - self.prefix_len
        end = start + key.shape[2]
        if end > self.keys.shape[3]:
            raise ValueError(
                f"KV cache holds {self.max_len} positions ({self.prefix_len} shared) but "
                f"{self.prefix_len + end} are needed; allocate more new positions (max_new) or generate fewer tokens"
            )
        self.keys[layer, :, :, start:end] = key
        self.values[layer, :, :, start:end] = value
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def write(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """As KVCache.write: prefix + new [b g s k], the prefix copied to each row (for the
        explicit path, whose hooks see the usual scores and pattern)."""
        own_k, own_v = self.write_own(layer, key, value)
        b = own_k.shape[0]
        full_k = torch.cat([self.prefix_keys[layer].expand(b, -1, -1, -1), own_k], dim=2)
        return full_k, torch.cat([self.prefix_values[layer].expand(b, -1, -1, -1), own_v], dim=2)

    def prefix(self, layer: int) -> tuple[Tensor, Tensor]:
        """The shared prefix's keys and values of one layer, [g P k] each."""
        return self.prefix_keys[layer], self.prefix_values[layer]

    def truncate(self, length: int) -> None:
        if not self.prefix_len <= length <= self.length:
            raise ValueError(
                f"cannot truncate a cache of length {self.length} to {length}: its shared prefix "
                f"({self.prefix_len} positions) stays"
            )
        self.length = length

    def select_rows(self, rows: Tensor) -> "SharedPrefixKVCache":
        out = SharedPrefixKVCache.__new__(SharedPrefixKVCache)
        out.prefix_keys, out.prefix_values = self.prefix_keys, self.prefix_values
        out.keys, out.values = self.keys[:, rows].clone(), self.values[:, rows].clone()
        out.prefix_len, out.max_len, out.length = self.prefix_len, self.max_len, self.length
        return out
