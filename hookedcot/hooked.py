"""HookedCoT: the transformer plus the user's surface, in TransformerLens habits.

`model(tokens_or_text)`, `run_with_hooks`, `run_with_cache`, `with model.hooks(...)`,
`add_hook` / `reset_hooks`, `start_at_layer` / `stop_at_layer`, `inputs_embeds`, and the text
helpers (`to_tokens`, `tokenize`, `to_str_tokens`, ...). The forward pass itself is model.py's.
"""

from __future__ import annotations

import contextvars
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hookedcot.cache import ActivationCache
from hookedcot.config import ModelConfig
from hookedcot.hook_names import all_hook_names, spec_of
from hookedcot.hook_points import (
    _SCOPED,
    HookFn, HookRun, NameOrFilter, in_own_context, no_positions, remove_scoped_hooks, resolve_hooks, scoped_hooks,
)
from hookedcot.inputs import (
    InputError, check_attention_mask, check_generate_prompt, check_length, check_position_ids, check_tokens,
)
from hookedcot.kv_cache import KVCache
from hookedcot.tokenizer import NoTokenizerError, Tokenizer
from hookedcot.tl_kv_cache import HookedTransformerKeyValueCache, tl_cache_attention_mask
from hookedcot.model import Transformer

TextOrTokens = Union[str, Sequence[str], Tensor]
ReturnType = Literal["logits", "loss", "both", None]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


class HookedCoT(Transformer):
    """A Qwen2 / LLaMA-family decoder whose every activation has a named hook point."""

    # Debug mode: every hook's output is checked for NaN/inf and the first hook to turn a finite
    # activation non-finite raises NonFiniteError naming it. Costs a check per hook call, nothing
    # at hook points nobody listens to; read once per forward, so it applies to every thread.
    check_finite: bool = False

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None):
        super().__init__(cfg)
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        self._persistent: dict[str, list[HookFn]] = {}
        self._hook_names = all_hook_names(cfg.n_layers)
        self._default_cache_names = [n for n in self._hook_names if not spec_of(n).opt_in]
        _bind_hook_names(self)
        self._sync_cfg_device()

    def __setstate__(self, state: dict) -> None:  # unpickled (torch.load of a whole model): rebind hook names
        super().__setstate__(state)
        _bind_hook_names(self)

    def _sync_cfg_device(self) -> None:
        """Keep `cfg.device` (TransformerLens' field) equal to where the weights are."""
        device = str(self.embed.weight.device)
        if self.cfg.device != device:
            self.cfg = self.cfg.replace(device=device)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "HookedCoT":
        out = super()._apply(fn, *args, **kwargs)  # .to(), .cuda(), .cpu(), .half() all end here
        if getattr(self, "placement", None) is not None and len({p.device for p in self.parameters()}) == 1:
            self.placement = None  # `.to(device)` gathered a split model onto one device
        self._sync_cfg_device()
        return out

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> "HookedCoT":
        """Load an HF checkpoint folder, a hub id, a GGUF file, or an embedded model's name.

        `device_map` splits the model over devices layer by layer: "auto" (balanced over the
        visible GPUs by free memory) or e.g. `{"hook_embed": "cuda:0", "blocks.0-13": "cuda:0",
        "blocks.14-27": "cuda:1", "ln_final": "cuda:1"}` (hookedcot.device_map); each tensor is
        read straight to its device, and the residual moves only where blocks change device.

        TransformerLens' options are accepted: `default_prepend_bos` and `default_padding_side`
        set the tokenizer's defaults; the weight-processing flags (`fold_ln`,
        `center_writing_weights`, `center_unembed`, `fold_value_biases`,
        `refactor_factored_attn_matrices`) change nothing, because hookedcot never folds or
        centres weights (its logits equal transformers'); asking for them warns once.
        Weights require grad (as in TransformerLens and transformers): wrap inference in
        `torch.no_grad()` / `torch.inference_mode()`, or pass `requires_grad=False`."""
        from hookedcot.loading import load_pretrained

        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, device_map=device_map, **kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, name_or_path: str | Path, **kwargs: Any) -> "HookedCoT":
        """TransformerLens' name for loading without weight processing — what `from_pretrained`
        always does here."""
        for flag in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                     "refactor_factored_attn_matrices"):
            kwargs.setdefault(flag, False)
        return cls.from_pretrained(name_or_path, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input: TextOrTokens | Float[Tensor, "batch pos d_model"] | None = None,
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        position_ids: Int[Tensor, "batch pos"] | None = None,
        inputs_embeds: Float[Tensor, "batch pos d_model"] | None = None,
        return_type: ReturnType = "logits",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        past_kv: KVCache | None = None,
        loss_per_token: bool = False,
        last_logits_only: bool = False,
        tokens: Int[Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | HookedTransformerKeyValueCache | None = None,
        shortformer_pos_embed: Tensor | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> Any:
        """Run the model. `input` is text, token ids [batch, pos] / [pos], or — with
        `start_at_layer` — the residual [batch, pos, d_model] entering that block.

        With `stop_at_layer` the residual entering that block is returned instead of logits.
        `attention_mask` (1 = token, 0 = left padding) covers the cached prefix too when
        `past_kv` is given; position ids follow from it so a padded row equals the row run alone.
        `last_logits_only` unembeds only the last position (generation: hooks still see them all).
        This method prepares the inputs, the hooks and the loss; `Transformer.forward` computes.
        TransformerLens' names: `past_kv_cache` (= `past_kv`), `tokens` (the loss targets when
        starting from a residual), `shortformer_pos_embed` (must be None: rotary models have none),
        `prepend_bos` / `padding_side` (for text input, and for TL's cache object: with a
        `HookedTransformerKeyValueCache` the mask covers the new tokens only, read off their pads).
        """
        if shortformer_pos_embed is not None:
            raise ValueError("shortformer_pos_embed must be None: hookedcot's models use rotary positions")
        if past_kv_cache is not None:
            if past_kv is not None and past_kv is not past_kv_cache:
                raise ValueError("pass past_kv or past_kv_cache (TransformerLens' name), not both")
            past_kv = past_kv_cache
        targets = tokens
        tokens, x, attention_mask = self._prepare_input(input, inputs_embeds, attention_mask, start_at_layer,
                                                        prepend_bos, padding_side)
        if tokens is None and targets is not None:
            tokens = targets.to(self.device)
        b, p = x.shape[:2]
        if isinstance(past_kv, HookedTransformerKeyValueCache):
            attention_mask = tl_cache_attention_mask(
                past_kv, tokens, p, b, attention_mask, self.tokenizer, padding_side,
                self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos, x.device)
        past_len = past_kv.length if past_kv is not None else 0
        check_length(b, p, past_len, self.cfg.n_ctx)
        if position_ids is not None:
            check_position_ids(position_ids, b, p)
        if attention_mask is not None:
            all_ones = check_attention_mask(attention_mask, b, past_len, p)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            if all_ones:
                attention_mask = None
        positions = torch.arange(past_len, past_len + p, device=x.device)
        if position_ids is None:
            position_ids = positions[None].expand(b, p)
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if return_type in ("loss", "both") and tokens is None and stop_at_layer is None:
            raise ValueError("return_type='loss' needs token ids (the targets); it cannot be computed from embeddings")
        run = HookRun(self._persistent, positions, position_ids, attention_mask, owner=self)
        try:
            out = super().forward(
                x, run, position_ids, attention_mask, past_kv,
                start_at_layer=None if start_at_layer is None else self._layer_index(start_at_layer, "start_at_layer"),
                stop_at_layer=None if stop_at_layer is None else self._layer_index(stop_at_layer, "stop_at_layer"),
                last_logits_only=last_logits_only,
                logits=return_type is not None,
            )
        except BaseException:
            if past_kv is not None and (past_kv.length != past_len or isinstance(past_kv, HookedTransformerKeyValueCache)):
                past_kv.truncate(past_len)  # a failed call leaves the cache as it was (TL's grows per layer)
            raise
        if stop_at_layer is not None or return_type in ("logits", None):
            return out
        if tokens.device != out.device:  # a split model's logits are on the unembedding's device
            tokens = tokens.to(out.device)
            attention_mask = None if attention_mask is None else attention_mask.to(out.device)
        loss = self._next_token_loss(out, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (out, loss)

    def _prepare_input(self, input, inputs_embeds, attention_mask, start_at_layer, prepend_bos=None, padding_side=None):
        """-> (token ids or None, what the model runs on: token ids, embeddings or a residual,
        attention mask or None)."""
        if start_at_layer is not None:
            if not (isinstance(input, Tensor) and input.is_floating_point() and input.dim() == 3):
                raise ValueError("with start_at_layer, pass the residual [batch, pos, d_model] as the input")
            return None, input, attention_mask
        if inputs_embeds is not None:
            if input is not None:
                raise ValueError("pass either input (text or tokens) or inputs_embeds, not both")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.d_model:
                raise ValueError(
                    f"inputs_embeds must be [batch, pos, {self.cfg.d_model}], got {tuple(inputs_embeds.shape)}"
                )
            return None, inputs_embeds.to(self.dtype), attention_mask
        if input is None:
            raise ValueError("nothing to run: pass text, token ids, or inputs_embeds")
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            if attention_mask is not None:
                raise ValueError("attention_mask is built from the text; pass token ids to give your own mask")
            tok = self._require_tokenizer()
            sides = {"padding_side": padding_side} if padding_side is not None else {}
            tokens, attention_mask = tok.tokenize(input, prepend_bos=self._prepend_bos(prepend_bos), **sides)
        elif isinstance(input, Tensor) and not input.is_floating_point():
            tokens = input[None] if input.dim() == 1 else input
            if tokens.dim() != 2:
                raise ValueError(f"token ids must be [batch, pos] or [pos], got shape {tuple(input.shape)}")
        else:
            raise TypeError(
                f"input must be a string, a list of strings or a LongTensor of token ids, got {type(input).__name__}"
                + (" (a float tensor: did you mean inputs_embeds=, or start_at_layer= with a residual?)"
                   if isinstance(input, Tensor) else "")
            )
        tokens = tokens.to(self.device)
        check_tokens(tokens, self.cfg.d_vocab)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return tokens, tokens, attention_mask

    def _layer_index(self, layer: int, what: str) -> int:
        n = self.cfg.n_layers
        if not -n <= layer <= n:
            raise ValueError(f"{what}={layer} is out of range for a model with {n} layers")
        return layer % n if layer < 0 else layer

    @staticmethod
    def _next_token_loss(logits: Tensor, tokens: Tensor, attention_mask: Tensor | None, per_token: bool) -> Tensor:
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]  # b p-1
        if per_token:
            return nll
        if attention_mask is None:
            return nll.mean()
        valid = attention_mask[:, 1:].to(nll.dtype) * attention_mask[:, :-1].to(nll.dtype)
        return (nll * valid).sum() / valid.sum().clamp(min=1)

    # ---------------------------------------------------------------- hooks
    def hook_names(self) -> list[str]:
        """Every hook name of this model, in firing order."""
        return list(self._hook_names)

    def _resolve(self, fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]]) -> list[tuple[str, HookFn]]:
        return resolve_hooks(fwd_hooks, self._hook_names)

    def hooks(
        self,
        fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> scoped_hooks:
        """`with model.hooks(fwd_hooks=[(name, fn)]):` — hooks for this block and this thread only,
        removed on exit, also when the block raises.

        `bwd_hooks` (TransformerLens') call `fn(grad, hook)` with the gradient of that activation
        when a backward pass reaches it (a returned tensor replaces the gradient); they attach to
        the activations of forwards run inside the block, so run the backward inside it too.
        `reset_hooks_end=False` is not supported: use `model.add_hook` for hooks that outlive a call."""
        if not reset_hooks_end:
            raise ValueError("reset_hooks_end=False is not supported: add hooks that should stay with model.add_hook(name, fn)")
        resolved = self._resolve(fwd_hooks) + [(n, _backward(f)) for n, f in self._resolve(bwd_hooks)]
        return scoped_hooks(resolved, owner=self)  # `with ... as m` gives the model

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One forward with these hooks. Backward hooks stay attached to the activations of this
        forward, so `model.run_with_hooks(x, bwd_hooks=...).sum().backward()` calls them (in
        TransformerLens they are removed before a backward can happen)."""
        hooks = self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end)

        def call() -> Any:
            with hooks:
                return self(*args, **kwargs)

        return in_own_context(call)  # its hooks cannot outlive the call, however it ends

    def add_hook(
        self,
        name: NameOrFilter,
        fn: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """A persistent hook: every later forward, in every thread, until `reset_hooks()`
        (`is_permanent=True` / `add_perma_hook`: until `reset_hooks(including_permanent=True)`).
        `dir="bwd"`: `fn(grad, hook)` on the activation's gradient. `prepend`: run before the
        hooks already there. Threads: a forward already running in another thread keeps the hooks
        it started with; the new hook applies from that thread's next forward (in a generation,
        its next step). `reset_hooks()` works the same way. Concurrent adds from several threads
        all land."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        resolved = self._resolve([(name, fn)])
        with _PERSISTENT_LOCK:  # read-copy-replace: two threads adding at once must both land
            persistent = {k: list(v) for k, v in self._persistent.items()}
            for n, f in resolved:
                f = _backward(f) if dir == "bwd" else _Persistent(f)
                f.is_permanent = is_permanent
                fns = persistent.setdefault(n, [])
                if prepend:
                    fns.insert(0, f)
                else:
                    fns.append(f)
            self._persistent = persistent  # replaced, never mutated: a running forward keeps its view

    def add_perma_hook(self, name: NameOrFilter, fn: HookFn, dir: Literal["fwd", "bwd"] = "fwd") -> None:
        """A hook that `reset_hooks()` leaves alone (only `reset_hooks(including_permanent=True)` removes it)."""
        self.add_hook(name, fn, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: Literal["fwd", "bwd", "both"] = "both",
                    including_permanent: bool = False, level: int | None = None) -> None:
        """Remove this model's hooks of `direction`: persistent ones (permanent ones too with
        `including_permanent`) and, as in TransformerLens, those that enclosing
        `with model.hooks(...)` blocks added to it in this thread (they stay removed when the
        block ends; other threads' and other models' hooks are untouched)."""
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"direction must be 'fwd', 'bwd' or 'both', got {direction!r}")

        def removed(fn: Any) -> bool:
            kind = "bwd" if isinstance(fn, _backward) else "fwd"
            return direction in ("both", kind) and (including_permanent or not getattr(fn, "is_permanent", False))

        with _PERSISTENT_LOCK:
            kept = {name: [f for f in fns if not removed(f)] for name, fns in self._persistent.items()}
            self._persistent = {name: fns for name, fns in kept.items() if fns}
        remove_scoped_hooks(self, removed)

    def remove_all_hook_fns(self, direction: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        """TransformerLens' name for `reset_hooks` without its other arguments."""
        self.reset_hooks(direction=direction, including_permanent=including_permanent)

    @property
    def hook_dict(self) -> dict[str, "HookPoint"]:
        """name -> HookPoint (TransformerLens' `model.hook_dict` / `mod_dict`): `.name`,
        `.add_hook(fn, dir=, prepend=)`, `.add_perma_hook(fn)`, `.remove_hooks()`."""
        return {name: HookPoint(self, name) for name in self._hook_names}

    mod_dict = hook_dict

    def active_hook_names(self) -> list[str]:
        """Hook points a forward run here and now would call hooks on: persistent hooks plus
        those scoped to this thread by enclosing `hooks()` blocks."""
        return sorted(HookRun(self._persistent, no_positions(), None, None, owner=self).active)

    def cache_names(self, names_filter: NamesFilter = None) -> list[str]:
        """The hook names a `names_filter` selects (None: everything but the opt-in hook_result)."""
        if names_filter is None:
            return list(self._default_cache_names)
        if isinstance(names_filter, str):
            resolve_hooks([(names_filter, _noop)], self._hook_names)
            return [names_filter]
        if callable(names_filter):
            return [n for n in self._hook_names if names_filter(n)]
        names = list(names_filter)
        resolve_hooks([(n, _noop) for n in names], self._hook_names)
        return names

    def run_with_cache_compiled(self, tokens: Tensor, names_filter: NamesFilter = None) -> tuple[Tensor, ActivationCache]:
        """`run_with_cache` of token ids (no padding, no hooks active) as one compiled graph whose
        outputs are the records (graph_cache.py): one compile per shape, then no Python per hook."""
        from hookedcot.graph_cache import run_with_cache_compiled

        return run_with_cache_compiled(self, tokens, names_filter)

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NamesFilter = None,
        fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (),
        device: torch.device | str | None = None,
        detach: bool = True,
        remove_batch_dim: bool = False,
        pos_slice: Any = None,
        return_cache_object: bool = True,
        incl_bwd: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Forward once, recording the activations `names_filter` selects (after any `fwd_hooks`
        edits). `detach=False` keeps them in the autograd graph (attribution patching).

        As in TransformerLens: `remove_batch_dim=True` stores row 0 of a batch-1 run without the
        batch axis; `pos_slice` (an int, a tuple, a slice, indices) keeps those positions of each
        activation's position axis (the query axis of scores and patterns; an int keeps a
        size-1 axis); `return_cache_object=False` returns a plain dict; `incl_bwd=True` calls
        `backward()` on the output (a scalar: e.g. `return_type="loss"`) and also caches each
        activation's gradient as `name + "_grad"`."""
        from hookedcot.cache import Slice

        positions = Slice([pos_slice] if isinstance(pos_slice, int) else pos_slice)
        store: dict[str, Tensor] = {}

        def keep(x: Tensor, name: str, key: str) -> None:
            x = x.detach() if detach else x
            if remove_batch_dim:
                if x.shape[0] != 1:
                    raise ValueError(f"remove_batch_dim=True needs a batch of 1; {name!r} has batch {x.shape[0]}")
                x = x[0]
            if positions.mode != "identity":
                axis = _position_axis(name)
                if axis is not None:
                    dim = axis - (1 if remove_batch_dim else 0)
                    try:
                        x = positions.apply(x, dim=dim)
                    except IndexError:
                        raise InputError(
                            f"pos_slice={pos_slice!r} selects positions outside the sequence: {name!r} has "
                            f"{x.shape[dim]} positions (valid indices -{x.shape[dim]}..{x.shape[dim] - 1})"
                        ) from None
            store[key] = x.to(device) if device is not None else x

        def record(x: Tensor, hook) -> None:
            keep(x, hook.name, hook.name)

        def record_grad(grad: Tensor, hook) -> None:
            keep(grad, hook.name, hook.name + "_grad")

        names = self.cache_names(names_filter)
        hooks = self.hooks(list(fwd_hooks) + [(n, record) for n in names], [(n, record_grad) for n in names] if incl_bwd else ())

        def call() -> Any:
            with hooks:
                out = self(*args, **kwargs)
                if incl_bwd:
                    if not (isinstance(out, Tensor) and out.numel() == 1):
                        raise ValueError("incl_bwd=True calls backward() on the output, so it must be a scalar: pass return_type='loss'")
                    out.backward()
            return out

        try:
            out = in_own_context(call)  # its hooks cannot outlive the call, however it ends
        except BaseException:
            # The traceback holds this frame (a notebook keeps the last one): without this, a
            # failed or interrupted call would keep its partial cache alive with it.
            store.clear()
            raise
        if not return_cache_object:
            return out, store
        return out, ActivationCache(store, self, has_batch_dim=not remove_batch_dim)

    # ---------------------------------------------------------------- TransformerLens' helpers
    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, "d_model"]:
        """[d_model]: the output biases (attention's o_proj, the MLP's down_proj, where the model
        has them) written before block `layer`'s input (`mlp_input`: its MLP's). Zero for
        checkpoints without those biases (most)."""
        if not 0 <= layer <= self.cfg.n_layers or (mlp_input and layer == self.cfg.n_layers):
            raise ValueError(f"layer={layer} is out of range (0..{self.cfg.n_layers}; mlp_input needs < {self.cfg.n_layers})")
        total = torch.zeros(self.cfg.d_model, device=self.device, dtype=self.dtype)
        for i in range(layer + (1 if mlp_input else 0)):
            block = self.blocks[i]
            if block.attn.o_proj.bias is not None:
                total = total + block.attn.o_proj.bias
            if include_mlp_biases and i < layer and block.mlp.down_proj.bias is not None:
                total = total + block.mlp.down_proj.bias
        return total

    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Tensor:
        """The unembedding direction(s) of `tokens`: [d_model] for one token (an int, a string of
        one token, a 1-element tensor), [..., d_model] for a tensor of several. Residual vectors
        after the final norm (e.g. `cache.apply_ln_to_stack`) dot with these to give logits."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.unembed.weight[tokens.to(self.device)]
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, Tensor):
            token = int(tokens.item())
        elif isinstance(tokens, int):
            token = tokens
        else:
            raise ValueError(f"tokens must be a string, an int or a tensor of token ids, got {type(tokens).__name__}")
        return self.unembed.weight[token]

    def input_to_embed(
        self,
        input: TextOrTokens,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: Tensor | None = None,
        past_kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor, None, Tensor | None]:
        """TransformerLens' (residual entering block 0, tokens, shortformer_pos_embed = None,
        attention_mask): `model(residual, start_at_layer=0, tokens=tokens, attention_mask=mask)`
        then equals `model(input)`. Text is padded on `padding_side` (left by default)."""
        if isinstance(input, Tensor):
            tokens = (input[None] if input.dim() == 1 else input).to(self.device)
        else:
            tok = self._require_tokenizer()
            sides = {"padding_side": padding_side} if padding_side is not None else {}
            tokens, mask = tok.tokenize(input, prepend_bos=self._prepend_bos(prepend_bos), **sides)
            tokens = tokens.to(self.device)
            if attention_mask is None and not bool(mask.all()):
                attention_mask = mask.to(self.device)
        if isinstance(past_kv_cache, HookedTransformerKeyValueCache):
            prepend = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
            attention_mask = tl_cache_attention_mask(past_kv_cache, tokens, tokens.shape[1], tokens.shape[0],
                                                     attention_mask, self.tokenizer, padding_side, prepend, self.device)
        elif past_kv_cache is not None and attention_mask is not None and attention_mask.shape[1] == tokens.shape[1]:
            past = torch.ones(tokens.shape[0], past_kv_cache.length, dtype=attention_mask.dtype, device=self.device)
            attention_mask = torch.cat([past, attention_mask], dim=1)
        return self.embed(tokens), tokens, None, attention_mask

    # TransformerLens' switches. The hooks they name are always hookable here (built only when
    # something listens); a switch says whether `run_with_cache` records them by default.
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """`blocks.L.attn.hook_result` in a default full cache (batch × pos × heads × d_model per layer)."""
        self._default_cache_opt_in(("attn.hook_result",), use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """`blocks.L.hook_q_input` / `hook_k_input` / `hook_v_input` in a default full cache."""
        self._default_cache_opt_in(("hook_q_input", "hook_k_input", "hook_v_input"), use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """`blocks.L.hook_mlp_in` in a default full cache."""
        self._default_cache_opt_in(("hook_mlp_in",), use_hook_mlp_in)

    def _default_cache_opt_in(self, suffixes: tuple[str, ...], on: bool) -> None:
        chosen = {n for n in self._hook_names if spec_of(n).opt_in and n.endswith(suffixes)}
        current = set(self._default_cache_names)
        current = current | chosen if on else current - chosen
        self._default_cache_names = [n for n in self._hook_names if n in current]

    def all_head_labels(self) -> list[str]:
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    # ---------------------------------------------------------------- text
    def set_tokenizer(self, tokenizer: Any, default_padding_side: str | None = None) -> None:
        """Use `tokenizer` for text (TransformerLens' `set_tokenizer`): a hookedcot Tokenizer, a
        transformers fast tokenizer (converted), or any object with `tokenize`. `cfg.default_prepend_bos`
        takes the tokenizer's own habit (`add_bos`)."""
        if not hasattr(tokenizer, "tokenize") or hasattr(tokenizer, "backend_tokenizer"):
            tokenizer = Tokenizer.from_transformers(tokenizer)
        if default_padding_side is not None:
            tokenizer.padding_side = default_padding_side
        self.tokenizer = tokenizer
        if isinstance(getattr(tokenizer, "add_bos", None), bool):
            self.cfg = self.cfg.replace(default_prepend_bos=tokenizer.add_bos)  # a copy: cfgs may be shared

    def _require_tokenizer(self):
        """The tokenizer (pass `self._prepend_bos(prepend_bos)` to it: BOS follows `cfg.default_prepend_bos`)."""
        tok = self.tokenizer
        if tok is None:
            raise NoTokenizerError(
                "this model has no tokenizer: load a checkpoint folder with tokenizer.json, a GGUF file or "
                "'smollm2-135m-instruct', pass token ids instead of text, or model.set_tokenizer(tokenizer)"
            )
        return tok

    def _prepend_bos(self, prepend_bos: bool | None) -> bool | None:
        """A call's `prepend_bos`: as given, else `cfg.default_prepend_bos` (TL code assigns that
        field; the tokenizer, which other models or threads may share, is never changed). A
        tokenizer of one's own without `add_bos` keeps its own habit (None)."""
        if prepend_bos is not None or not isinstance(getattr(self.tokenizer, "add_bos", None), bool):
            return prepend_bos
        return bool(self.cfg.default_prepend_bos)

    def to_tokens(
        self, input: str | Sequence[str], prepend_bos: bool | None = None, padding_side: str | None = None,
        move_to_device: bool = True, truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids [batch, pos] (TransformerLens' `to_tokens`). Strings of different lengths are
        padded with the pad token on `padding_side` (default `model.tokenizer.padding_side`: 'left'
        unless you set it); `truncate` keeps each row's first `cfg.n_ctx` tokens. The attention
        mask is not returned: for batches of different lengths use `tokenize` (ids and mask)."""
        tok = self._require_tokenizer()
        if hasattr(tok, "padding_side"):
            tokens, _ = tok.tokenize(input, prepend_bos=self._prepend_bos(prepend_bos), padding_side=padding_side or tok.padding_side,
                                     max_length=self.cfg.n_ctx if truncate else None)
        else:  # a minimal tokenizer of one's own: ids and mask, left padded
            tokens, _ = tok.tokenize(input, prepend_bos=self._prepend_bos(prepend_bos))
        return tokens.to(self.device) if move_to_device else tokens

    def tokenize(self, text: str | Sequence[str], prepend_bos: bool | None = None) -> tuple[Tensor, Tensor]:
        """(token ids [batch, pos], attention mask [batch, pos]), left-padded."""
        tokens, mask = self._require_tokenizer().tokenize(text, prepend_bos=self._prepend_bos(prepend_bos))
        return tokens.to(self.device), mask.to(self.device)

    def to_string(self, tokens: Any) -> str | list[str]:
        """Text of one sequence of ids, or a list of texts for a batch [batch, pos] (tensors, arrays, lists)."""
        tok = self._require_tokenizer()
        tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, Tensor) else tokens)
        if tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.reshape(-1).tolist())

    def to_str_tokens(self, input: Any, prepend_bos: bool | None = None, padding_side: str | None = None) -> list:
        """Each token as text. A string, or one sequence of ids ([pos] / [1, pos] tensor or array, a
        list of ints); a list of strings / sequences gives a list per item (TransformerLens)."""
        tok = self._require_tokenizer()
        if isinstance(input, (list, tuple)) and input and not isinstance(input[0], (int, np.integer)):
            return [self.to_str_tokens(x, prepend_bos) for x in input]
        if isinstance(input, str):
            ids = tok.tokenize(input, prepend_bos=self._prepend_bos(prepend_bos))[0][0].tolist()
        elif isinstance(input, (Tensor, np.ndarray)):
            if input.ndim == 2 and input.shape[0] != 1:
                raise ValueError("to_str_tokens takes one sequence; index the batch row you want, or pass a list")
            ids = [int(i) for i in input.reshape(-1).tolist()]
        else:
            ids = list(input)
        return tok.token_strings(ids)

    def to_single_token(self, text: str) -> int:
        return self._require_tokenizer().to_single_token(text)

    def to_single_str_token(self, int_token: int) -> str:
        """The text of one token id (TransformerLens)."""
        return self._require_tokenizer().token_strings([int(int_token)])[0]

    def get_token_position(self, single_token: str | int | Tensor, input: str | Tensor, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """Where a single token (text or id) occurs first / last (`mode`) in a text or one sequence of ids."""
        return self._require_tokenizer().get_token_position(single_token, input, mode=mode, prepend_bos=self._prepend_bos(prepend_bos))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self._require_tokenizer().apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def find_positions(self, tokens: Tensor | Sequence[int], text: str, occurrence: int = 0) -> list[int]:
        """Positions of the tokens of `tokens` (one sequence) that spell `text`."""
        ids = tokens.reshape(-1).tolist() if isinstance(tokens, Tensor) else list(tokens)
        return self._require_tokenizer().find_token_positions(ids, text, occurrence=occurrence)

    # ---------------------------------------------------------------- generation
    def generate(self, input: str | Sequence[str] | Tensor, max_new_tokens: int = 64, **kwargs: Any) -> Any:
        """Decode with a KV cache. Hooks active around the call (`with model.hooks(...)`) or given
        as `fwd_hooks=` fire on the prompt and then on each new position (`hook.positions`).

        `input`: text, a list of texts (left-padded), token ids, or embeddings [batch, pos, d_model].
        Returns what came in: a string (prompt + completion) for a string, a list for a list,
        token ids [batch, prompt + new] for token ids, embeddings for embeddings
        (`return_type="str"|"tokens"|"embeds"` overrides); `output_logits=True` returns a
        `GenerateOutput` (`sequences`, `logits`: one [batch, d_vocab] per step). Options:
        attention_mask, do_sample, temperature (0: greedy), top_k, top_p, freq_penalty, seed,
        stop_at_eos, eos_token_id, stop_strings, fwd_hooks, use_cache (TL: use_past_kv_cache),
        prepend_bos, on_token(step, tokens), verbose."""
        from hookedcot.generate import generate

        self._check_generate_options(input, kwargs)
        check_generate_prompt(input, kwargs.get("attention_mask"), max_new_tokens, self.cfg.n_ctx)
        return in_own_context(generate, self, input, max_new_tokens, **kwargs)  # hooks die with the call

    def _check_generate_options(self, input: Any, kwargs: dict[str, Any]) -> None:
        """TransformerLens' checks before generating: transformers-only flags are dropped with a
        warning; text needs a tokenizer and an explicit stop_at_eos=True needs an EOS id (both
        errors are also AssertionErrors, as TL raises)."""
        ignored = [k for k in _HF_ONLY_GENERATE_FLAGS if kwargs.pop(k, None) is not None]
        if ignored:
            warnings.warn(f"unsupported generation kwargs ignored: {', '.join(ignored)} (output_logits=True "
                          "returns each step's logits)", UserWarning, stacklevel=3)
        if self.tokenizer is None and (isinstance(input, str) or (isinstance(input, (list, tuple)) and input
                                                                  and isinstance(input[0], str))):
            raise NoTokenizerError("generate got text but the model has no tokenizer: pass token ids, or "
                                   "model.set_tokenizer(tokenizer) first")
        eos_known = (kwargs.get("eos_token_id") is not None or self.cfg.eos_token_id is not None
                     or getattr(self.tokenizer, "eos_token_id", None) is not None)
        if kwargs.get("stop_at_eos") is True and not eos_known:
            raise NoTokenizerError("stop_at_eos=True but no eos_token_id is known (no tokenizer, none in the "
                                   "config): pass eos_token_id=..., or stop_at_eos=False")

    def generate_stream(self, input: str | Sequence[str] | Tensor, max_new_tokens: int = 10,
                        max_tokens_per_yield: int = 25, **kwargs: Any) -> Iterator[Any]:
        """TransformerLens' `generate_stream`: chunks of at most `max_tokens_per_yield` new token ids
        (the first starts with the prompt's), or text with `return_type="str"`; `generate`'s options."""
        from hookedcot.generate import generate_stream

        check_generate_prompt(input, kwargs.get("attention_mask"), max_new_tokens, self.cfg.n_ctx)
        return _stream_in_own_context(generate_stream(self, input, max_new_tokens, max_tokens_per_yield, **kwargs))

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"HookedCoT({c.model_name!r}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads / "
            f"{c.n_key_value_heads} kv, d_mlp {c.d_mlp}, vocab {c.d_vocab}, {self.dtype}, {self.device})"
        )


# transformers' generate flags with no meaning here: warned about and ignored (TransformerLens too).
_HF_ONLY_GENERATE_FLAGS = ("output_scores", "output_attentions", "output_hidden_states")


# Persistent hooks are published by replacing `model._persistent` (a forward reads it once, so a
# running forward keeps the set it started with); the lock makes each read-copy-replace atomic.
_PERSISTENT_LOCK = threading.RLock()


def _noop(x: Tensor, hook: Any) -> None:
    return None


def _stream_in_own_context(chunks: Iterator[Any]) -> Iterator[Any]:
    """Each step of a generation stream (and its closing) in one context of its own, so the hooks
    its steps install cannot leak into the consumer's, however a step ends."""
    own = contextvars.copy_context()
    try:
        while True:
            try:
                chunk = own.run(next, chunks)
            except StopIteration:
                return
            yield chunk
    finally:
        own.run(chunks.close)


class _Persistent:
    """A persistent forward hook (a wrapper so it can carry `is_permanent`)."""

    def __init__(self, fn: HookFn):
        self.fn, self.is_permanent = fn, False

    def __call__(self, x: Tensor, hook: Any) -> Any:
        return self.fn(x, hook)


class _backward:
    """A backward hook as a forward hook: registers `fn(grad, hook)` on the activation's gradient."""

    def __init__(self, fn: HookFn):
        self.fn, self.is_permanent = fn, False

    def __call__(self, x: Tensor, hook: Any) -> None:
        if x.requires_grad:
            x.register_hook(lambda grad: self._on_grad(grad, hook))
        return None

    def _on_grad(self, grad: Tensor, hook: Any) -> Tensor | None:
        out = self.fn(grad, hook)
        return out[0] if isinstance(out, tuple) else out  # TL's hooks may return (grad,)


class HookPoint:
    """One hook point of one model, as TransformerLens code handles it (`model.hook_dict[name]`)."""

    def __init__(self, model: "HookedCoT", name: str):
        self.model, self.name = model, name

    def add_hook(self, fn: HookFn, dir: Literal["fwd", "bwd"] = "fwd", is_permanent: bool = False,
                 level: int | None = None, prepend: bool = False) -> None:
        self.model.add_hook(self.name, fn, dir=dir, is_permanent=is_permanent, prepend=prepend)

    def add_perma_hook(self, fn: HookFn, dir: Literal["fwd", "bwd"] = "fwd") -> None:
        self.model.add_hook(self.name, fn, dir=dir, is_permanent=True)

    def _hooks(self, backward: bool) -> list[HookFn]:
        fns = list(self.model._persistent.get(self.name, []))
        fns += [fn for who, name, fn in _SCOPED.get() if who is self.model and name == self.name]
        return [f for f in fns if isinstance(f, _backward) == backward]

    @property
    def fwd_hooks(self) -> list[HookFn]:
        """The forward hooks a forward run here and now would call at this point."""
        return self._hooks(backward=False)

    @property
    def bwd_hooks(self) -> list[HookFn]:
        return self._hooks(backward=True)

    def remove_hooks(self, dir: Literal["fwd", "bwd", "both"] = "fwd", including_permanent: bool = False, level: int | None = None) -> None:
        """Remove this point's persistent hooks of direction `dir`."""
        model = self.model
        with _PERSISTENT_LOCK:
            fns = [f for f in model._persistent.get(self.name, [])
                   if not (dir in ("both", "bwd" if isinstance(f, _backward) else "fwd")
                           and (including_permanent or not getattr(f, "is_permanent", False)))]
            persistent = {k: list(v) for k, v in model._persistent.items() if k != self.name}
            if fns:
                persistent[self.name] = fns
            model._persistent = persistent

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


class HookName(str):
    """A module's hook-name attribute (`model.blocks[0].hook_resid_pre`, `model.hook_embed`):
    the name itself — the forward dispatches on it as on any string — that also answers
    TransformerLens' `HookPoint` calls (`.add_hook(fn)`, `.remove_hooks()`, `.fwd_hooks`, ...) for
    the model it belongs to (held weakly: the model owns its modules)."""

    def __new__(cls, name: str, model: "HookedCoT") -> "HookName":
        out = super().__new__(cls, name)
        out._model = weakref.ref(model)
        return out

    @property
    def name(self) -> str:
        return str(self)

    def _point(self) -> HookPoint:
        return HookPoint(self._model(), str(self))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._point(), attr)

    def __reduce__(self) -> Any:  # pickles as the plain name
        return (str, (str(self),))

    def __deepcopy__(self, memo: dict) -> str:
        """In a deep copy of the model, the copy's name (bound to the copied model)."""
        twin = memo.get(id(self._model()))
        return HookName(str(self), twin) if twin is not None else str(self)


def _bind_hook_names(model: "HookedCoT") -> None:
    """Turn every module's `hook_*` string attribute into a HookName of `model`."""
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if attr.startswith("hook_") and type(value) is str:
                object.__setattr__(module, attr, HookName(value, model))


def _position_axis(name: str) -> int | None:
    """The position axis of hook `name` (the query axis of scores and patterns), or None."""
    letters = spec_of(name).shape.split()
    for letter in ("p", "q"):
        if letter in letters:
            return letters.index(letter)
    return None
