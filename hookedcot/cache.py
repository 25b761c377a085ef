"""ActivationCache: the activations a `run_with_cache` recorded, with TransformerLens' helpers.

The helpers follow TransformerLens' semantics where they share its name (layer -1 / None /
n_layers means "up to the unembedding"; an integer `pos_slice` drops the position axis; `to`
moves in place). One deliberate difference: hookedcot never folds the norms' weights into the
next matrices, so `apply_ln_to_stack` multiplies by the norm's weight after dividing by the
cached scale; the components then still sum to what the next layer (or the unembedding) reads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from hookedcot.errors import HookedCoTError
from hookedcot.hook_names import get_act_name, suggest

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT

SliceInput = Union[None, int, slice, tuple, Sequence[int], Tensor, np.ndarray]


class Slice:
    """TransformerLens' slice: None keeps the axis, an int indexes it (the axis is dropped), a
    tuple `(start, stop[, step])` or a `slice` slices it, a list / tensor / array takes those indices."""

    def __init__(self, input_slice: "SliceInput | Slice" = None):
        if isinstance(input_slice, Slice):
            self.slice, self.mode = input_slice.slice, input_slice.mode
        elif isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, (int, np.integer)) and not isinstance(input_slice, bool):
            self.slice, self.mode = int(input_slice), "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, Tensor, np.ndarray)):
            index = torch.as_tensor(np.asarray(input_slice.cpu() if isinstance(input_slice, Tensor) else input_slice))
            self.slice, self.mode = (int(index), "int") if index.dim() == 0 else (index, "array")
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise ValueError(f"invalid slice {input_slice!r}: use None, an int, a tuple, a slice, or a list/tensor of indices")

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        if self.mode == "identity":
            return tensor
        index: list[Any] = [slice(None)] * tensor.ndim
        index[dim] = self.slice.to(tensor.device) if isinstance(self.slice, Tensor) else self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: "int | None" = None) -> np.ndarray:
        """The indices this slice picks from an axis of length `max_ctx`, as an int64 array
        (`array([4])` for an int slice, which needs no `max_ctx`)."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be specified if slice is not an integer")
        if self.mode == "array":
            return np.arange(max_ctx, dtype=np.int64)[self.slice.cpu().numpy()]
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice({self.slice!r}, mode={self.mode!r})"


class BatchDimError(HookedCoTError, ValueError, AssertionError):
    """The cache's batch axis cannot do what was asked (an AssertionError too, as TransformerLens raises)."""


class ActivationCache:
    """A dict of hook name -> tensor. `cache["resid_post", 3]` is short for
    `cache["blocks.3.hook_resid_post"]`; `cache["scale", 3, "ln2"]` picks a norm; a negative
    layer counts from the end (`cache["resid_post", -1]`)."""

    def __init__(self, store: dict[str, Tensor], model: "HookedCoT", has_batch_dim: bool = True):
        self.cache_dict = store
        self.model = model
        self.has_batch_dim = has_batch_dim

    @property
    def has_embed(self) -> bool:
        return "hook_embed" in self.cache_dict

    # dict-like
    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            if key in self.cache_dict:
                return key
            return get_act_name(key) if "." not in key and not key.startswith("hook_") else key
        if isinstance(key, tuple):
            if len(key) > 1 and key[1] is not None and key[1] < 0:
                key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
            return get_act_name(*key)
        raise KeyError(f"a cache key is a hook name or a tuple like ('resid_post', 3), got {key!r}")

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
        try:
            return self._key(key) in self.cache_dict
        except (KeyError, TypeError, ValueError):  # "pattern" without a layer names nothing
            return False

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
        """Move every activation to `device`, in place (as TransformerLens does); returns self."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self.cache_dict)[:4])}{', ...' if len(self) > 4 else ''})"

    # batch axis
    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a batch-1 cache, in place (TransformerLens'); returns self."""
        if not self.has_batch_dim:
            logging.warning("Tried removing batch dimension after already having removed it.")
            return self
        for name, value in self.cache_dict.items():
            if value.size(0) != 1:
                raise BatchDimError(
                    f"cannot remove the batch axis of a cache with batch size {value.size(0)} ({name!r} has shape "
                    f"{tuple(value.shape)}); use cache.apply_slice_to_batch_dim(i) to pick one row"
                )
        self.cache_dict = {k: v[0] for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: SliceInput | Slice) -> "ActivationCache":
        """A new cache with `batch_slice` applied to every activation's batch axis (an int drops it)."""
        batch_slice = Slice(batch_slice)
        if not self.has_batch_dim and batch_slice.mode != "identity":
            raise BatchDimError("this cache has no batch axis (remove_batch_dim was called)")
        return ActivationCache(
            {k: batch_slice.apply(v, dim=0) for k, v in self.cache_dict.items()},
            self.model,
            has_batch_dim=self.has_batch_dim and batch_slice.mode != "int",
        )

    def toggle_autodiff(self, mode: bool = False) -> None:
        """`torch.set_grad_enabled(mode)` for the whole process, as TransformerLens' does.
        `with torch.no_grad():` does the same without changing global state."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    # TransformerLens helpers
    def _layer(self, layer: int | None) -> int:
        """None, -1 and n_layers all mean "the input of the unembedding"."""
        n = self.model.cfg.n_layers
        if layer is None or layer == -1:
            return n
        if not 0 <= layer <= n:
            raise ValueError(f"layer={layer} is out of range: use 0..{n}, or -1 / None for the whole stack")
        return layer

    def stack_activation(self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None) -> Tensor:
        """[layers before `layer` (all for -1 / None), *shape]: one per-layer activation stacked."""
        n = self._layer(layer)
        return torch.stack([self[get_act_name(activation_name, i, sublayer_type)] for i in range(n)], dim=0)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Any:
        """The residual stream entering each block up to and including block `layer`'s input
        (`"{l}_pre"`), and with `layer` = -1 / None / n_layers also the final residual
        (`"final_post"`): [component, batch, pos, d_model].

        `incl_mid` adds `resid_mid` of the earlier layers, `mlp_input` that of layer `layer`.
        `apply_ln` for the whole stack puts each component through the final norm on its own
        scale (the logit lens: `model.unembed(out[-1])` equals the logits); for a block's input
        it divides by that block's cached ln1 (ln2 with `mlp_input`) scale, as TransformerLens does.

        >>> resid, labels = cache.accumulated_resid(apply_ln=True, pos_slice=-1, return_labels=True)
        >>> layer_logits = model.unembed(resid)       # [n_layers + 1, batch, d_vocab]
        """
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        n = self.model.cfg.n_layers
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n:
                parts.append(self["resid_post", n - 1]); labels.append("final_post")
                continue
            parts.append(self["resid_pre", i]); labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self["resid_mid", i]); labels.append(f"{i}_mid")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in parts], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "component *batch_and_pos d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceInput | Slice = None,
        batch_slice: SliceInput | Slice = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Tensor:
        """Treat each component of `residual_stack` as input to block `layer`'s ln1 (ln2 with
        `mlp_input`), or to the final norm for `layer` -1 / None / n_layers, and normalise it.

        By default each component is divided by the *cached* scale of the full residual, so the
        components still sum to the normalised residual (direct logit attribution). With
        `recompute_ln=True` and the final norm, each component is normalised on its own (the logit
        lens). `pos_slice` / `batch_slice` say which positions / rows the stack holds (they are
        applied to the cached scale; `batch_slice` also to the stack's axis 1).
        Unlike TransformerLens (whose weights are folded by default), the norm's weight is applied:
        hookedcot's weights are never folded."""
        pos_slice, batch_slice = Slice(pos_slice), Slice(batch_slice)
        layer = self._layer(layer)
        n = self.model.cfg.n_layers
        if layer == n:
            norm = self.model.ln_final
        else:
            norm = self.model.blocks[layer].ln2 if mlp_input else self.model.blocks[layer].ln1
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and layer == n:
            return norm(residual_stack)
        scale_name = norm.hook_scale
        if scale_name not in self.cache_dict:
            raise KeyError(
                f"apply_ln_to_stack needs {scale_name!r} in the cache"
                + (" (or recompute_ln=True)" if layer == n else "")
                + "; widen run_with_cache's names_filter to record it"
            )
        scale = pos_slice.apply(self.cache_dict[scale_name], dim=-2)
        if self.has_batch_dim:
            scale = batch_slice.apply(scale, dim=0)
        dtype = residual_stack.dtype
        return norm.weight * (residual_stack.float() / scale).to(dtype)

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Any:
        """The residual entering block `layer` (-1 / None / n_layers: the unembedding) as a stack
        of what wrote it: [component, batch, pos, d_model] — the embedding, then each earlier
        layer's attn_out and mlp_out (`mode` "attn" / "mlp" keeps one kind; `mlp_input` adds layer
        `layer`'s attn_out). The components sum to that residual; `apply_ln` divides them by its
        cached norm scale (see `apply_ln_to_stack`)."""
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        parts, labels = [], []
        if incl_embeds and self.has_embed:
            parts.append(self["hook_embed"]); labels.append("embed")
        for i in range(layer):
            if mode != "mlp":
                parts.append(self["attn_out", i]); labels.append(f"{i}_attn_out")
            if mode != "attn":
                parts.append(self["mlp_out", i]); labels.append(f"{i}_mlp_out")
        if mlp_input and mode != "mlp":
            parts.append(self["attn_out", layer]); labels.append(f"{layer}_attn_out")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in parts], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # per-head and per-neuron contributions
    def _W_O(self, layer: int) -> Tensor:
        """[n_heads, d_head, d_model]: head h's slice of block `layer`'s output projection."""
        attn = self.model.blocks[layer].attn
        return attn.o_proj.weight.T.reshape(attn.n_heads, attn.d_head, -1)

    def compute_head_results(self) -> None:
        """Fill `blocks.L.attn.hook_result` ([batch, pos, head, d_model], what each head writes,
        without the output bias) from the cached `hook_z`, unless it was recorded already."""
        for layer in range(self.model.cfg.n_layers):
            name = f"blocks.{layer}.attn.hook_result"
            if name not in self.cache_dict:
                z = self["z", layer]
                self.cache_dict[name] = torch.einsum("...hk,hkd->...hd", z, self._W_O(layer).to(z.dtype))

    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceInput | Slice = None,
        apply_ln: bool = False,
    ) -> Any:
        """[layer × n_heads (labels "L{l}H{h}"), batch, pos, d_model]: every head's result in the
        layers before `layer` (-1 / None: all); `incl_remainder` adds the rest of that residual."""
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        self.compute_head_results()
        labels = [f"L{l}H{h}" for l in range(layer) for h in range(self.model.cfg.n_heads)]
        heads = [pos_slice.apply(self["result", l], dim=-3).movedim(-2, 0) for l in range(layer)]
        shape = pos_slice.apply(self["hook_embed"], dim=-2).shape
        stack = torch.cat(heads) if heads else self["hook_embed"].new_zeros(0, *shape)
        if incl_remainder:
            residual = pos_slice.apply(self["resid_pre", layer] if layer < self.model.cfg.n_layers
                                       else self["resid_post", layer - 1], dim=-2)
            stack = torch.cat([stack, (residual - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: SliceInput | Slice = None,
        pos_slice: SliceInput | Slice = None,
        project_output_onto: Tensor | None = None,
    ) -> Tensor:
        """[batch, pos, neuron, d_model]: what each MLP neuron of `layer` writes (no bias). With
        `project_output_onto` ([d_model] or [d_model, n]) the last axis is that projection,
        computed without the [..., neuron, d_model] intermediate."""
        neuron_slice, pos_slice = Slice(neuron_slice), Slice(pos_slice)
        acts = neuron_slice.apply(pos_slice.apply(self["post", layer], dim=-2), dim=-1)
        W_out = neuron_slice.apply(self.model.blocks[layer].mlp.down_proj.weight.T, dim=0).to(acts.dtype)
        if project_output_onto is None:
            return acts[..., None] * W_out
        projected = W_out @ project_output_onto.to(acts.dtype)  # [neuron(, n)]
        return acts * projected if project_output_onto.ndim == 1 else acts[..., None] * projected

    def _norm(self, layer: int, mlp_input: bool) -> Any:
        if layer == self.model.cfg.n_layers:
            return self.model.ln_final
        return self.model.blocks[layer].ln2 if mlp_input else self.model.blocks[layer].ln1

    def stack_neuron_results(
        self,
        layer: int | None,
        pos_slice: SliceInput | Slice = None,
        neuron_slice: SliceInput | Slice = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: Tensor | None = None,
        _mlp_input: bool = False,
    ) -> Any:
        """[layer × neurons (labels "L{l}N{n}"), batch, pos, d_model]: every MLP neuron's result in
        the layers before `layer`. Large (batch × pos × d_mlp × d_model per layer) unless
        `project_output_onto` ([d_model] or [d_model, n]) replaces d_model by that projection."""
        pos_slice, neuron_slice = Slice(pos_slice), Slice(neuron_slice)
        layer = self._layer(layer)
        ids = neuron_slice.apply(torch.arange(self.model.cfg.d_mlp), dim=0).reshape(-1).tolist()
        labels = [f"L{l}N{i}" for l in range(layer) for i in ids]
        project, squeeze = _as_2d(project_output_onto)
        scale = None
        if apply_ln and project is not None:
            # RMSNorm with the cached scale is linear: fold its weight into the projection.
            norm = self._norm(layer, _mlp_input)
            project = norm.weight.to(project.dtype)[:, None] * project
            scale = pos_slice.apply(self[norm.hook_scale], dim=-2)[..., None]
        parts = []
        for l in range(layer):
            part = self.get_neuron_results(l, neuron_slice, pos_slice, project)
            if neuron_slice.mode == "int":
                part = part[..., None, :]
            if scale is not None:
                part = (part.float() / scale).to(part.dtype)
            parts.append(part.movedim(-2, 0))
        embed = pos_slice.apply(self["hook_embed"], dim=-2)
        width = project.shape[-1] if project is not None else embed.shape[-1]
        stack = torch.cat(parts) if parts else embed.new_zeros(0, *embed.shape[:-1], width)
        if incl_remainder:
            residual = pos_slice.apply(self["resid_post", layer - 1], dim=-2) if layer else embed
            if project is not None:
                residual = self.apply_ln_to_stack(residual[None], layer, _mlp_input, pos_slice=pos_slice)[0] if apply_ln else residual
                residual = residual @ _as_2d(project_output_onto)[0].to(residual.dtype)
            stack = torch.cat([stack, (residual - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln and project is None:
            stack = self.apply_ln_to_stack(stack, layer, _mlp_input, pos_slice=pos_slice)
        if squeeze:
            stack = stack[..., 0]
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        return_labels: bool = False,
        project_output_onto: Tensor | None = None,
    ) -> Any:
        """The residual entering block `layer` (-1 / None: the unembedding) as every head's result,
        every neuron's (or, without `expand_neurons`, every MLP's) output, the embedding and the
        summed biases ("bias") — TransformerLens' order. The components sum to that residual.
        `project_output_onto` ([d_model] or [d_model, n]) projects each component (after the norm
        with `apply_ln`), never building the per-neuron d_model vectors."""
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        project, squeeze = _as_2d(project_output_onto)

        def finish(stack: Tensor) -> Tensor:
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
            return stack @ project.to(stack.dtype) if project is not None else stack

        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True)
        parts = [finish(heads)]
        if layer > 0:
            if expand_neurons:
                mlps, mlp_labels = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True, apply_ln=apply_ln,
                                                             project_output_onto=project, _mlp_input=mlp_input)
            else:
                mlps, mlp_labels = self.decompose_resid(layer, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True)
                mlps = finish(mlps)
            parts.append(mlps); labels = labels + mlp_labels
        if self.has_embed:
            parts.append(finish(pos_slice.apply(self["hook_embed"], dim=-2)[None])); labels.append("embed")
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(finish(bias.to(heads.dtype).expand(1, *heads.shape[1:]))); labels.append("bias")
        stack = torch.cat(parts)
        if squeeze:
            stack = stack[..., 0]
        return (stack, labels) if return_labels else stack

    def logit_attrs(
        self,
        residual_stack: Float[Tensor, "component *batch_and_pos d_model"],
        tokens: Any,
        incorrect_tokens: Any = None,
        pos_slice: SliceInput | Slice = None,
        batch_slice: SliceInput | Slice = None,
        has_batch_dim: bool = True,
    ) -> Tensor:
        """[component, *batch_and_pos]: each component's direct contribution to the logit of
        `tokens` (minus that of `incorrect_tokens`), through the final norm's cached scale. The
        components of `decompose_resid()` sum to the logit (difference) itself."""
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape, got {tuple(directions.shape)} "
                                 f"and {tuple(wrong.shape)}")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        return (scaled * directions.to(scaled.dtype)).sum(-1)


def _as_2d(project: Tensor | None) -> tuple[Tensor | None, bool]:
    """(projection as [d_model, n], whether it was [d_model] and the result's last axis goes)."""
    if project is None:
        return None, False
    return (project[:, None], True) if project.ndim == 1 else (project, False)
