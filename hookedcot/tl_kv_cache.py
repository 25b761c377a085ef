"""TransformerLens' key/value cache object, for TL code that drives the cache by hand.

TL's `HookedTransformerKeyValueCache` grows with every forward, can be frozen (used but not
extended: try several continuations of one prefix) and remembers the attention mask of what it
holds, so a later forward's mask covers only the new tokens. hookedcot's own `KVCache`
(preallocated, used by `generate` and the sweeps) does not grow or freeze; this class gives TL's
semantics on the same attention code: it answers the calls `Attention` makes on a cache
(`write`, `advance`, `length`, `truncate`), storing keys and values in TL's layout.

    >>> cache = HookedTransformerKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)  # doctest: +SKIP
    >>> model(prefix_tokens, past_kv_cache=cache); cache.freeze()                         # doctest: +SKIP
    >>> model(continuation_tokens, past_kv_cache=cache)      # the prefix is reused, not extended  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookedcot.config import ModelConfig
from hookedcot.utils import padding_mask


@dataclass
class HookedTransformerKeyValueCacheEntry:
    """One layer's cached keys and values, [batch, pos, n_key_value_heads, d_head] (TL's layout)."""

    past_keys: Tensor
    past_values: Tensor
    frozen: bool = False


class HookedTransformerKeyValueCache:
    """A growing, freezable cache with TL's surface: `init_cache`, `entries`, `freeze`,
    `unfreeze`, `frozen`, `previous_attention_mask`, `append_attention_mask`. Pass it to
    `model(..., past_kv_cache=cache)`; a forward's `attention_mask` then covers its new tokens only
    (TL's convention; a mask covering the cached positions too is accepted as well)."""

    shared_prefix = False  # the attention code's questions to a cache (kv_cache.KVCache)
    static = False

    def __init__(self, entries: list[HookedTransformerKeyValueCacheEntry], previous_attention_mask: Tensor,
                 frozen: bool = False):
        self.entries = entries
        self.previous_attention_mask = previous_attention_mask
        self.frozen = frozen
        self.length = previous_attention_mask.shape[1]
        self._pending_mask: Tensor | None = None  # this forward's full mask, kept once it succeeds

    @classmethod
    def init_cache(cls, cfg: ModelConfig, device: Any = None, batch_size: int = 1) -> "HookedTransformerKeyValueCache":
        device = device if device is not None else cfg.device
        shape = (batch_size, 0, cfg.n_key_value_heads, cfg.d_head)
        entries = [
            HookedTransformerKeyValueCacheEntry(torch.empty(shape, device=device), torch.empty(shape, device=device))
            for _ in range(cfg.n_layers)
        ]
        return cls(entries, torch.empty(batch_size, 0, dtype=torch.int, device=device))

    def freeze(self) -> None:
        """Use the cache without extending it: later forwards attend to what it holds now."""
        self.frozen = True
        for entry in self.entries:
            entry.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False
        for entry in self.entries:
            entry.frozen = False

    def __getitem__(self, layer: int) -> HookedTransformerKeyValueCacheEntry:
        return self.entries[layer]

    # ------------------------------------------------------------ what the forward calls
    def append_attention_mask(self, attention_mask: Tensor) -> Tensor:
        """The mask of cached + new positions (TL's method; remembered unless the cache is frozen)."""
        updated = self._after_cached(attention_mask)
        if not self.frozen:
            self.previous_attention_mask = updated
        return updated

    def full_attention_mask(self, attention_mask: Tensor | None, n_new: int, batch: int, device: Any) -> Tensor:
        """`attention_mask` for the new tokens (None: all attended), or already covering the cached
        positions too -> the mask over cached + new positions. It becomes the cache's mask when the
        forward succeeds (`advance`): a call that fails, or only asks (`input_to_embed`), changes nothing."""
        if attention_mask is not None and self.length and attention_mask.shape[-1] == self.length + n_new:
            full = attention_mask
        else:
            if attention_mask is None:
                attention_mask = torch.ones(batch, n_new, dtype=torch.int, device=device)
            full = self._after_cached(attention_mask)
        self._pending_mask = full
        return full

    def _after_cached(self, attention_mask: Tensor) -> Tensor:
        """The cached positions' mask followed by `attention_mask` (the new tokens')."""
        cached = self.previous_attention_mask.to(attention_mask.device, attention_mask.dtype)
        return torch.cat([cached, attention_mask], dim=-1)

    def write(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append `key`/`value` [b g p k] to this layer's entry (unless frozen); return the cached
        positions followed by the new ones, [b g s k]."""
        entry = self.entries[layer]
        new_k, new_v = key.transpose(1, 2), value.transpose(1, 2)  # b p g k
        if entry.past_keys.shape[1]:
            full_k = torch.cat([entry.past_keys.to(new_k.dtype), new_k], dim=1)
            full_v = torch.cat([entry.past_values.to(new_v.dtype), new_v], dim=1)
        else:
            full_k, full_v = new_k, new_v
        if not self.frozen:
            entry.past_keys, entry.past_values = full_k.detach(), full_v.detach()
        return full_k.transpose(1, 2), full_v.transpose(1, 2)

    def advance(self, n: int) -> None:
        """The forward succeeded: its positions (and its mask) are now cached, unless frozen."""
        pending, self._pending_mask = self._pending_mask, None
        if not self.frozen:
            self.length += n
            if pending is not None and pending.shape[-1] == self.length:
                self.previous_attention_mask = pending
            else:  # a forward that built no mask here (e.g. hookedcot's own past_kv= path): all attended
                pad = torch.ones(self.previous_attention_mask.shape[0], n, dtype=self.previous_attention_mask.dtype,
                                 device=self.previous_attention_mask.device)
                self.previous_attention_mask = torch.cat([self.previous_attention_mask, pad], dim=-1)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (a failed forward leaves the cache as it was)."""
        for entry in self.entries:
            entry.past_keys, entry.past_values = entry.past_keys[:, :length], entry.past_values[:, :length]
        self.previous_attention_mask = self.previous_attention_mask[:, :length]
        self.length, self._pending_mask = length, None


def tl_cache_attention_mask(cache: HookedTransformerKeyValueCache, tokens: Tensor | None, n_new: int, batch: int,
                            attention_mask: Tensor | None, tokenizer: Any, padding_side: str | None,
                            prepend_bos: bool, device: Any) -> Tensor:
    """The mask of a forward on TL's cache, as TL builds it: the given mask for the new tokens, or
    one read off their pad tokens (on `padding_side`, else the tokenizer's), after the cached mask."""
    if attention_mask is None and tokens is not None and tokenizer is not None:
        side = padding_side or getattr(tokenizer, "padding_side", "right")
        attention_mask = padding_mask(tokens, getattr(tokenizer, "pad_token_id", None),
                                      getattr(tokenizer, "bos_token_id", None), side, prepend_bos)
    return cache.full_attention_mask(attention_mask, n_new, batch, device)
