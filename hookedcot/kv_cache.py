"""A preallocated key/value cache: one buffer per layer, written in place, never reallocated.

Generation writes each new position's keys and values at `length` and attends over the prefix;
patching sweeps reuse a run's prefix keys/values so only positions from the patch on are recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hookedcot.config import ModelConfig


def _store(keys: Tensor, values: Tensor, layer: int, start: int, end: int, key: Tensor,
           value: Tensor) -> tuple[Tensor, Tensor]:
    """Write `key`/`value` [b g n k] at positions [start, end) of one layer's buffers; return
    positions [0, end) of each.

    With gradients the buffers get detached copies and the caller fresh tensors (cached part + new
    part): writing a grad-tracking tensor in place would hang the forward's graph on the buffers,
    where the views of them that attention saves close a reference cycle that keeps every
    activation of the call alive for good, and the next layer's write would bump the version of
    what attention saved, so backward would fail. Without gradients: plain in-place writes and
    views, the fast path generation and sweeps run."""
    if key.requires_grad or value.requires_grad:
        keys[layer, :, :, start:end] = key.detach()
        values[layer, :, :, start:end] = value.detach()
        return (torch.cat([keys[layer, :, :, :start], key], dim=2),
                torch.cat([values[layer, :, :, :start], value], dim=2))
    keys[layer, :, :, start:end] = key
    values[layer, :, :, start:end] = value
    return keys[layer, :, :, :end], values[layer, :, :, :end]


class KVCache:
    shared_prefix = False  # see SharedPrefixKVCache
    static = False  # see StaticKVCache

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
        return _store(self.keys, self.values, layer, self.length, end, key, value)

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
        return _store(self.keys, self.values, layer, start, end, key, value)

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


class StaticMask:
    """The attention mask of one forward over a `StaticKVCache`: True where attention is allowed,
    [b, 1, p, capacity]. It has `AttentionMask`'s surface (`bool_mask`, `is_causal`, `key_valid`,
    `blocked`) so the attention code does not know which cache it runs on."""

    is_causal = False

    def __init__(self, allowed: Tensor):
        self.bool_mask = self.key_valid = allowed

    def blocked(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        return ~self.bool_mask


class StaticKVCache(KVCache):
    """A fixed-capacity cache whose shapes never change: every forward attends over all `capacity`
    slots, positions not yet written (or padding) masked out. That is what lets one compiled
    decode step serve every step of a generation: nothing in it depends on how long the sequence
    is so far (gpt-fast's cache). Buffers are zeroed so masked slots hold no NaN for the
    probability-times-value product.

    Two ways to drive it. Through `model(tokens, past_kv=cache, attention_mask=...)` it behaves as
    `KVCache` (the mask covers the cached prefix + the new positions; `length` advances). A decode
    loop that owns the bookkeeping (`fast_decode.py`) sets `driven = True`, writes the positions of
    each step into `input_pos` and the keys that may be read into `key_valid` in place, and passes
    `key_valid` as the attention mask; then the forward reads no Python number that changes from
    step to step. Per-layer buffers (not views of one tensor), so an in-place write in a compiled
    graph updates one input rather than a slice of a shared one.

    `attend_all = False` makes each forward attend over the slots written so far only (a Python
    number per step: for steps that are not compiled). Attention then sums over exactly the keys
    the dynamic cache holds, so its bits equal `KVCache`'s (float32 and bfloat16); over the whole
    capacity they differ by rounding (bfloat16: by an ulp of the output, enough to flip a greedy
    token at a near tie)."""

    static = True

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch, cfg.n_key_value_heads, capacity, cfg.d_head)
        self.layer_keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.layer_values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len, self.length, self.driven = capacity, 0, False
        self.attend_all, self.end = True, 0  # end: slots in use (step_mask sets it, or a driver)
        self.key_valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)
        self._eager_pos = self.input_pos
        self._slots = torch.arange(capacity, device=device)

    @property
    def keys(self) -> Tensor:
        """[layers, b, g, capacity, k] (a stacked copy, for inspection)."""
        return torch.stack(self.layer_keys)

    @property
    def values(self) -> Tensor:
        return torch.stack(self.layer_values)

    def step_mask(self, attention_mask: Tensor | None, n_new: int) -> StaticMask:
        """The mask of a forward adding `n_new` positions. Driven: `attention_mask` is
        `key_valid` itself and `input_pos` was set by the driver. Otherwise `attention_mask`
        covers prefix + new positions (None: no padding), as for `KVCache`."""
        if not self.driven:
            end = self.length + n_new
            if end > self.max_len:
                raise ValueError(f"static KV cache holds {self.max_len} positions but {end} are needed; "
                                 "allocate a larger capacity or generate fewer tokens")
            self._eager_pos = torch.arange(self.length, end, device=self._slots.device)
            valid = torch.zeros_like(self.key_valid)
            valid[:, :end] = True if attention_mask is None else attention_mask.bool()
            attention_mask = valid
            self.end = end
        n = self.span
        q_pos, slots = self._positions(), self._slots[:n]
        causal = slots[None, :] <= q_pos[:, None]  # p n
        own = slots[None, :] == q_pos[:, None]  # a padded query attends to itself: no all -inf row
        return StaticMask(((causal[None] & attention_mask[:, None, :n]) | own[None])[:, None])

    @property
    def span(self) -> int:
        """The slots a forward attends over: every one, or (`attend_all` off) those in use."""
        return self.max_len if self.attend_all else self.end

    def write(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store `key`/`value` [b g p k] at `input_pos`; return the slots attended over, [b g span k]
        (every slot unless `attend_all` is off)."""
        k_buf, v_buf = self.layer_keys[layer], self.layer_values[layer]
        k_buf.index_copy_(2, self._positions(), key)
        v_buf.index_copy_(2, self._positions(), value)
        n = self.span
        return (k_buf, v_buf) if n == self.max_len else (k_buf[:, :, :n], v_buf[:, :, :n])

    def _positions(self) -> Tensor:
        """The slots this forward writes: the driver's `input_pos`, else those after `length`."""
        return self.input_pos if self.driven else self._eager_pos

    def advance(self, n: int) -> None:
        if not self.driven:  # a driver counts positions itself (no Python state changes in its graph)
            self.length += n

    def select_rows(self, rows: Tensor) -> "StaticKVCache":
        out = StaticKVCache.__new__(StaticKVCache)
        out.layer_keys = [k[rows].clone() for k in self.layer_keys]
        out.layer_values = [v[rows].clone() for v in self.layer_values]
        out.max_len, out.length, out.driven = self.max_len, self.length, self.driven
        out.attend_all, out.end = self.attend_all, self.end
        out.key_valid, out.input_pos, out._slots = self.key_valid[rows].clone(), self.input_pos.clone(), self._slots
        out._eager_pos = self._eager_pos
        return out
