"""ActivationCache: the activations a `run_with_cache` recorded, with TransformerLens' helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from hookedcot.hook_names import get_act_name, suggest

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT


class ActivationCache:
    """A dict of hook name -> tensor. `cache["resid_post", 3]` is short for
    `cache["blocks.3.hook_resid_post"]`; `cache["scale", 3, "ln2"]` picks a norm."""

    def __init__(self, store: dict[str, Tensor], model: "HookedCoT"):
        self.cache_dict = store
        self.model = model

    # dict-like
    def _key(self, key: Any) -> str:
        if isinstance(key, tuple):
            return get_act_name(*key)
        return get_act_name(key) if isinstance(key, str) and "." not in key and not key.startswith("hook_") else key

    def __getitem__(self, key: Any) -> Tensor:
        name = self._key(key)
        if name not in self.cache_dict:
            hint = suggest(name, list(self.cache_dict)) if self.cache_dict else []
            raise KeyError(
                f"{name!r} is not in this cache (it holds {len(self.cache_dict)} activations)"
                + (f"; closest: {', '.join(hint)}" if hint else "")
                + ". Widen run_with_cache's names_filter to record it."
            )
        return self.cache_dict[name]

    def __contains__(self, key: Any) -> bool:
        return self._key(key) in self.cache_dict

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def to(self, device: torch.device | str) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.cache_dict.items()}, self.model)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self.cache_dict)[:4])}{', ...' if len(self) > 4 else ''})"

    # TransformerLens helpers
    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> Tensor:
        """[n_layers (up to `layer`), *shape]: one per-layer activation stacked across layers."""
        n = self.model.cfg.n_layers if layer == -1 else layer
        return torch.stack([self[get_act_name(activation_name, i, sublayer_type)] for i in range(n)], dim=0)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: slice | int | None = None,
        return_labels: bool = False,
    ) -> Any:
        """The residual stream before each layer (and the final residual when `layer` is None):
        [component, batch, pos, d_model]. With `apply_ln` each component goes through the final
        RMSNorm on its own scale (the logit lens), so `model.unembed(out[-1])` equals the logits."""
        n = self.model.cfg.n_layers if layer is None else layer
        parts, labels = [], []
        for i in range(n):
            parts.append(self["resid_pre", i]); labels.append(f"{i}_pre")
            if incl_mid:
                parts.append(self["resid_mid", i]); labels.append(f"{i}_mid")
        if layer is None or layer == self.model.cfg.n_layers:
            parts.append(self["resid_post", self.model.cfg.n_layers - 1]); labels.append("final_post")
        stack = torch.stack(parts, dim=0)
        stack = _slice_pos(stack, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, recompute_ln=True)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "... d_model"],
        layer: int | None = None,
        pos_slice: slice | int | None = None,
        recompute_ln: bool = False,
    ) -> Tensor:
        """Apply the final RMSNorm (or block `layer`'s ln1) to a stack of residual components.

        By default each component is divided by the *cached* scale of the full residual (so the
        components still sum to the normalised residual — direct logit attribution); with
        `recompute_ln=True` each component is normalised on its own (the logit lens).
        The norm's weight is applied in both cases (hookedcot does not fold weights)."""
        norm = self.model.ln_final if layer is None or layer == self.model.cfg.n_layers else self.model.blocks[layer].ln1
        if recompute_ln:
            return norm(residual_stack)
        scale_name = norm.hook_scale
        if scale_name not in self.cache_dict:
            raise KeyError(f"apply_ln_to_stack needs {scale_name!r} in the cache (or recompute_ln=True)")
        scale = _slice_pos(self.cache_dict[scale_name], pos_slice)
        dtype = residual_stack.dtype
        return norm.weight * (residual_stack.float() / scale).to(dtype)

    def decompose_resid(self, layer: int | None = None, pos_slice: slice | int | None = None, return_labels: bool = False) -> Any:
        """[component, batch, pos, d_model]: embedding, then each layer's attn_out and mlp_out."""
        n = self.model.cfg.n_layers if layer is None else layer
        parts, labels = [self["hook_embed"]], ["embed"]
        for i in range(n):
            parts += [self["attn_out", i], self["mlp_out", i]]
            labels += [f"{i}_attn_out", f"{i}_mlp_out"]
        stack = _slice_pos(torch.stack(parts, dim=0), pos_slice)
        return (stack, labels) if return_labels else stack


def _slice_pos(t: Tensor, pos_slice: slice | int | None) -> Tensor:
    """Slice the position axis (the second to last) of a [..., batch, pos, d] tensor."""
    if pos_slice is None:
        return t
    if isinstance(pos_slice, int):
        pos_slice = slice(pos_slice, pos_slice + 1 if pos_slice != -1 else None)
    return t[..., pos_slice, :]
