"""Patching dictionary features from one model's run into another's, on the same tokens, in a
forward pass and while the patched model generates.

A `FeaturePatch(source_model, dictionary, features)` is an intervention on the *target* model:
at the dictionary's hook, the target's features (`features`, at `positions`) are replaced by the
source model's features on the same tokens, and the change is decoded and added (the
reconstruction error stays, so unpatched features keep the target's own activation exactly).
During generation the source model runs in lockstep: `prepare` runs it over the prompt, and
`on_token` (the `on_token=` callback of `generate`) feeds it each token the target has just
chosen, before the target's next forward reads the source's features at that position. The
source runs only up to the hooked block, with a KV cache of its own.

With an SAE (one model's dictionary, applied to two models that share its basis, e.g. a base
model's SAE on its fine-tune) both sides use the same encoder and decoder; with a crosscoder, the
source's features are its single-model view (`encode(x, model=source)`) and the target's edit
goes through the target's own decoder (`hook(target, ...)`). Interventions of this kind (objects
with `fwd_hooks()`, `prepare(...)` and `on_token(...)`) are accepted by `generate_with` and
`evaluate_accuracy` beside plain `(hook name, function)` pairs.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from hookedcot.dictionaries.sae import FeatureEdit
from hookedcot.kv_cache import KVCache


class FeaturePatch:
    """Replace the target's `features` (None: all) at `positions` by `source_model`'s.
    `source` / `target`: which model of a crosscoder each side is (index or name; default 1 -> 0,
    i.e. child into base when the crosscoder's models are [base, child])."""

    def __init__(self, source_model: Any, dictionary: Any, features: Sequence[int] | None = None, *,
                 positions: Any = None, source: int | str | None = None, target: int | str | None = None,
                 hook_name: str | None = None, error: bool = True):
        self.source_model, self.dictionary = source_model, dictionary
        self.hook_name = hook_name or dictionary.hook_name
        if self.hook_name is None:
            raise ValueError("the dictionary does not know its hook name: pass hook_name=")
        self.crosscoder = _is_crosscoder(dictionary)
        if not self.crosscoder and (source is not None or target is not None):
            raise ValueError("source= and target= choose a crosscoder's models; an SAE has one encoder and decoder")
        self.source_index = 1 if source is None else source
        self.target_index = 0 if target is None else target
        self.error = error
        self.edit = FeatureEdit("patch", features=features, positions=positions, source=self._features_at)
        source_model.cache_names([self.hook_name])  # a wrong hook name raises here
        self._layer = int(self.hook_name.split(".")[1]) if self.hook_name.startswith("blocks.") else None
        self._buffer: Tensor | None = None
        self._length = 0
        self._cache: KVCache | None = None
        self._mask: Tensor | None = None

    # -------------------------------------------------------------------------- the source side
    def prepare(self, tokens: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 0) -> "FeaturePatch":
        """Run the source over `tokens` [batch, pos] (left padded with `attention_mask`), keeping a
        cache for `max_new_tokens` more positions."""
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        b, p = tokens.shape
        model = self.source_model
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
        self._mask = torch.ones((b, p + max_new_tokens), dtype=torch.long, device=model.device)
        self._mask[:, :p] = mask.to(model.device)
        self._cache = KVCache(model.cfg, b, p + max_new_tokens, model.dtype, model.device) if max_new_tokens else None
        self._buffer, self._length = None, 0
        self._run(tokens, p + max_new_tokens)
        return self

    def on_token(self, step: int, next_tokens: Tensor) -> None:
        """`generate`'s callback: the token each row just chose goes through the source."""
        if self._cache is None:
            raise RuntimeError("prepare(tokens, mask, max_new_tokens) with max_new_tokens > 0 before generating")
        self._run(next_tokens[:, None], None)

    @torch.inference_mode()
    def _run(self, tokens: Tensor, total: int | None) -> None:
        model, kept = self.source_model, {}

        def keep(x: Tensor, hook: Any) -> None:
            kept["x"] = x

        end = self._length + tokens.shape[1]
        mask = self._mask[:, :end]
        stop = None if self._layer is None or self._layer + 1 >= model.cfg.n_layers else self._layer + 1
        with model.hooks([(self.hook_name, keep)]):
            model(tokens.to(model.device), attention_mask=mask, past_kv=self._cache, return_type=None, stop_at_layer=stop)
        features = self._encode(kept["x"])
        if self._buffer is None:
            self._buffer = features.new_zeros((*features.shape[:1], total or end, features.shape[-1]))
        self._buffer[:, self._length : end] = features
        self._length = end

    def _encode(self, x: Tensor) -> Tensor:
        if self.crosscoder:
            return self.dictionary.encode(x, model=self.source_index)
        return self.dictionary.encode(x)

    def _features_at(self, hook: Any) -> Tensor:
        if self._buffer is None:
            raise RuntimeError("the source has not run: call patch.prepare(tokens, attention_mask, max_new_tokens) "
                               "(generate_with and evaluate_accuracy do it)")
        positions = hook.positions
        if len(positions) and int(positions.max()) >= self._length:
            raise RuntimeError(f"the target reads position {int(positions.max())} but the source has run "
                               f"{self._length}: pass patch.on_token to generate(on_token=...)")
        return self._buffer[:, positions.to(self._buffer.device)]

    # -------------------------------------------------------------------------- the target side
    def fwd_hooks(self) -> list[tuple[str, Any]]:
        if self.crosscoder:
            return [self.dictionary.hook(self.target_index, self.edit, error=self.error, hook_name=self.hook_name)]
        return [self.dictionary.hook(self.edit, error=self.error, hook_name=self.hook_name)]

    def __repr__(self) -> str:
        return (f"FeaturePatch({self.hook_name}, features {self.edit.features if self.edit.features is not None else 'all'}"
                + (f", crosscoder {self.source_index} -> {self.target_index}" if self.crosscoder else "") + ")")


def _is_crosscoder(dictionary: Any) -> bool:
    return getattr(dictionary, "W_dec", None) is not None and dictionary.W_dec.dim() == 3


def split_intervention(spec: Any) -> tuple[list[tuple[str, Any]], list[Any]]:
    """(hook pairs, live interventions) from one intervention, a list of hook pairs and
    interventions, or nothing."""
    if spec is None:
        return [], []
    items = [spec] if hasattr(spec, "fwd_hooks") else list(spec)
    hooks, live = [], []
    for item in items:
        if hasattr(item, "fwd_hooks"):
            live.append(item)
            hooks += item.fwd_hooks()
        else:
            hooks.append(item)
    return hooks, live


def generate_with(model: Any, input: Any, max_new_tokens: int, interventions: Iterable[Any] = (), **kwargs: Any) -> Any:
    """`model.generate` with hook pairs and live interventions (`FeaturePatch`) together: each
    live one is prepared on the prompt and fed every chosen token."""
    hooks, live = split_intervention(interventions)
    if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
        tokens, mask = model.tokenize(input)
        kwargs.setdefault("return_type", "str")
        single = isinstance(input, str)
    else:
        tokens = input[None] if input.dim() == 1 else input
        mask, single = kwargs.pop("attention_mask", None), False
    for item in live:
        item.prepare(tokens, mask, max_new_tokens)
    user_callback = kwargs.pop("on_token", None)

    def on_token(step: int, next_tokens: Tensor) -> None:
        for item in live:
            item.on_token(step, next_tokens)
        if user_callback is not None:
            user_callback(step, next_tokens)

    out = model.generate(tokens, max_new_tokens, attention_mask=mask, fwd_hooks=[*kwargs.pop("fwd_hooks", ()), *hooks],
                         on_token=on_token, **kwargs)
    return out[0] if single and isinstance(out, list) else out
