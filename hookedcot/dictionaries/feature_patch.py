"""Interventions that need a second model running on the same tokens: patching one model's
dictionary features into another's run, and editing a crosscoder's joint latents, in a forward
pass and while the edited model generates.

The partner model runs in lockstep (`Lockstep`): `prepare` runs it over the prompt, and `on_token`
(the `on_token=` callback of `generate`) feeds it each token the edited model has just chosen,
before the edited model's next forward reads the partner's activation at that position. The
partner runs only up to the hooked block, with a KV cache of its own.

- `FeaturePatch(source_model, dictionary, features)` on the target model. With an **SAE** (one
  model's dictionary on two models that share its basis, e.g. a base model's SAE on its fine-tune)
  the target's features are replaced by the source's (encode both, swap, decode the change). With a
  **crosscoder** both activations give one *joint* latent f, and the two models differ only in their
  decoders; patching feature j from source s into target t replaces its contribution to t,
  f_j d_j^t, by its contribution to s, f_j d_j^s. `features=None` patches the whole reconstruction
  (every latent and the decoder bias): t's activation becomes s's up to the difference of their
  reconstruction errors.
- `JointEdit(partner_model, coder, edit, model="child")`: a `FeatureEdit` (zero, scale, clamp) on
  the joint latent while `model` runs, the partner supplying the other model's activation; the
  change goes through `model`'s decoder. (`coder.hook(model, edit)` needs no partner but edits the
  single-model view, an approximation of the joint latent.)

All keep the reconstruction error by default, so features left alone keep the model's own
activation exactly. Objects with `fwd_hooks()`, `prepare(...)` and `on_token(...)` are accepted
by `generate_with` and `evaluate_accuracy` beside plain `(hook name, function)` pairs.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from hookedcot.dictionaries.sae import FeatureEdit
from hookedcot.hook_names import stop_layer
from hookedcot.interp.positions import Positions
from hookedcot.kv_cache import KVCache


class Lockstep:
    """A partner model's activation at `hook_name` on the tokens another model reads, kept for
    every position so far (`at(hook)` gives it at the positions that hook sees)."""

    def __init__(self, model: Any, hook_name: str):
        model.cache_names([hook_name])  # a wrong hook name raises here, listing the nearest
        self.model, self.hook_name = model, hook_name
        self._stop = stop_layer([hook_name], model.cfg.n_layers) or None  # hook_embed: a whole forward, as before
        self._buffer: Tensor | None = None
        self._length = 0
        self._cache: KVCache | None = None
        self._mask: Tensor | None = None

    def prepare(self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None,
                max_new_tokens: int = 0) -> None:
        """Run over `tokens` (left padded with `attention_mask`), keeping a cache for
        `max_new_tokens` more positions. Call it again for other tokens: nothing carries over."""
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        b, p = tokens.shape
        device = self.model.device
        # A row that has finished keeps a 1 here and reads generate's padding: rows are independent
        # and a finished row's output is discarded, so this cannot reach the live rows.
        self._mask = torch.ones((b, p + max_new_tokens), dtype=torch.long, device=device)
        if attention_mask is not None:
            self._mask[:, :p] = attention_mask.to(device)
        layers = self._stop or self.model.cfg.n_layers  # the partner never runs past the hooked block
        cfg = dataclasses.replace(self.model.cfg, n_layers=layers)
        self._cache = KVCache(cfg, b, p + max_new_tokens, self.model.dtype, device) if max_new_tokens else None
        self._buffer, self._length = None, 0
        self._run(tokens, p + max_new_tokens)

    def on_token(self, step: int, next_tokens: Int[Tensor, " batch"]) -> None:
        """`generate`'s callback: the token each row just chose goes through the partner."""
        if self._cache is None:
            raise RuntimeError("prepare(tokens, mask, max_new_tokens) with max_new_tokens > 0 before generating")
        self._run(next_tokens[:, None], None)

    @torch.inference_mode()
    def _run(self, tokens: Tensor, total: int | None) -> None:
        kept = {}

        def keep(x: Tensor, hook: Any) -> None:
            kept["x"] = x

        def forward() -> None:
            with self.model.hooks([(self.hook_name, keep)]):
                self.model(tokens.to(self.model.device), attention_mask=self._mask[:, :end], past_kv=self._cache,
                           return_type=None, stop_at_layer=self._stop)

        end = self._length + tokens.shape[1]
        # A context of its own: the hooks the edited model runs under (even when the partner is the
        # same model) and its decode-kernel setting stay out of the partner's forward.
        contextvars.Context().run(forward)
        x = kept["x"]
        if self._buffer is None:
            self._buffer = x.new_zeros((x.shape[0], total or end, *x.shape[2:]))
        self._buffer[:, self._length : end] = x
        self._length = end

    def at(self, hook: Any) -> Tensor:
        if self._buffer is None:
            raise RuntimeError("the partner model has not run: call .prepare(tokens, attention_mask, max_new_tokens) "
                               "first (generate_with and evaluate_accuracy do it)")
        positions = hook.positions
        if len(positions) and int(positions.max()) >= self._length:
            raise RuntimeError(f"the edited model reads position {int(positions.max())} but its partner has run "
                               f"{self._length}: pass .on_token to generate(on_token=...) (or use generate_with)")
        rows = hook.position_ids.shape[0] if hook.position_ids is not None else None
        stale = self._cache is None and len(positions) != self._length
        if (rows is not None and rows != self._buffer.shape[0]) or stale:
            raise RuntimeError(f"the partner ran on {self._buffer.shape[0]} row(s) of {self._length} positions but the "
                               f"edited model runs {rows} row(s) of {len(positions)}: call .prepare(tokens, "
                               "attention_mask) with these tokens first")
        return self._buffer[:, positions.to(self._buffer.device)]


class _WithPartner:
    """What FeaturePatch and JointEdit share: the partner in lockstep (each adds `fwd_hooks()`)."""

    lockstep: Lockstep

    def prepare(self, tokens: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 0) -> Any:
        self.lockstep.prepare(tokens, attention_mask, max_new_tokens)
        return self

    def on_token(self, step: int, next_tokens: Tensor) -> None:
        self.lockstep.on_token(step, next_tokens)


class FeaturePatch(_WithPartner):
    """Patch `features` (None: all) at `positions` from `source_model` into the target model's run
    (module docstring). `source` / `target`: a crosscoder's models (name or index; default: its
    second model into its first, i.e. child into base for models [base, child])."""

    def __init__(self, source_model: Any, dictionary: Any, features: Sequence[int] | None = None, *,
                 positions: Any = None, source: int | str | None = None, target: int | str | None = None,
                 hook_name: str | None = None, error: bool = True):
        self.dictionary, self.features, self.error = dictionary, features, error
        self.hook_name = hook_name or dictionary.hook_name
        if self.hook_name is None:
            raise ValueError("the dictionary does not know its hook name: pass hook_name=")
        self.crosscoder = _is_crosscoder(dictionary)
        if self.crosscoder:
            _two_models(dictionary)
            self.source = dictionary.model_index(1 if source is None else source)
            self.target = dictionary.model_index(0 if target is None else target)
            if self.source == self.target:
                raise ValueError(f"source and target are the same model ({dictionary.models[self.source]!r})")
        elif source is not None or target is not None:
            raise ValueError("source= and target= choose a crosscoder's models; an SAE has one encoder and decoder")
        _check_features(features, dictionary.d_latent if self.crosscoder else dictionary.d_sae)
        self.lockstep = Lockstep(source_model, self.hook_name)
        self._where = Positions(positions)
        self._drop = FeatureEdit("zero", features=features, positions=positions)  # f - dropped(f): the chosen part
        self._edit = FeatureEdit("patch", features=features, positions=positions,
                                 source=lambda hook: dictionary.encode(self.lockstep.at(hook)))

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        if not self.crosscoder:
            return [self.dictionary.hook(self._edit, error=self.error, hook_name=self.hook_name)]
        coder, s, t = self.dictionary, self.source, self.target

        def patch(x: Tensor, hook: Any) -> Tensor:
            f = coder.encode(_stack(x, self.lockstep.at(hook), t))
            where = self._where(hook.positions)
            chosen = f - self._drop(f, hook)
            delta = (chosen @ coder.W_dec[:, s]) / coder.input_scale[s] - (chosen @ coder.W_dec[:, t]) / coder.input_scale[t]
            if self.features is None:  # the whole reconstruction: the decoder biases too
                bias = coder.b_dec[s] / coder.input_scale[s] - coder.b_dec[t] / coder.input_scale[t]
                delta = delta + (bias if where is None else where.to(x.device)[:, None] * bias)
            base = x if self.error else coder.decode(f, model=t)
            return base + delta.to(x.dtype)

        return [(self.hook_name, patch)]

    def __repr__(self) -> str:
        what = "all" if self.features is None else list(self.features)
        route = f", {self.dictionary.models[self.source]} -> {self.dictionary.models[self.target]}" if self.crosscoder else ""
        return f"FeaturePatch({self.hook_name}, features {what}{route})"


class JointEdit(_WithPartner):
    """`edit` (a FeatureEdit: zero, scale, clamp) on a two-model crosscoder's joint latent while
    `model` runs, `partner_model` supplying the other model's activation on the same tokens."""

    def __init__(self, partner_model: Any, coder: Any, edit: FeatureEdit, *, model: int | str = 1,
                 hook_name: str | None = None, error: bool = True):
        _two_models(coder)
        self.coder, self.edit, self.error = coder, edit, error
        self.model = coder.model_index(model)
        self.hook_name = hook_name or coder.hook_name
        if self.hook_name is None:
            raise ValueError("the crosscoder does not know its hook name: pass hook_name=")
        _check_features(edit.features, coder.d_latent)
        self.lockstep = Lockstep(partner_model, self.hook_name)

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        coder, m = self.coder, self.model

        def splice(x: Tensor, hook: Any) -> Tensor:
            f = coder.encode(_stack(x, self.lockstep.at(hook), m))
            edited = self.edit(f, hook)
            if not self.error:
                return coder.decode(edited, model=m).to(x.dtype)
            return x + ((edited - f) @ coder.W_dec[:, m] / coder.input_scale[m]).to(x.dtype)

        return [(self.hook_name, splice)]

    def __repr__(self) -> str:
        return f"JointEdit({self.hook_name}, {self.edit.op} on {self.coder.models[self.model]})"


def _is_crosscoder(dictionary: Any) -> bool:
    return getattr(dictionary, "W_dec", None) is not None and dictionary.W_dec.dim() == 3


def _check_features(features: Sequence[int] | None, n: int) -> None:
    bad = [j for j in (features or ()) if not 0 <= int(j) < n]
    if bad:
        raise ValueError(f"features {bad[:8]} out of range: the dictionary has {n} (0 to {n - 1})")


def _two_models(coder: Any) -> None:
    if coder.n_models != 2:
        raise ValueError(f"a joint latent needs every model's activation; this crosscoder reads {coder.n_models} "
                         f"models {coder.models} and a partner supplies one: use coder.hook(model, edit) instead")


def _stack(x: Tensor, partner: Tensor, index: int) -> Tensor:
    """[..., 2, d]: `x` at `index`, the partner's activation at the other place."""
    pair = (x, partner.to(x.device, x.dtype)) if index == 0 else (partner.to(x.device, x.dtype), x)
    return torch.stack(pair, dim=-2)


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


def generate_with(model: Any, input: str | Sequence[str] | Int[Tensor, "batch pos"], max_new_tokens: int,
                  interventions: Iterable[Any] = (), **kwargs: Any) -> Any:
    """`model.generate` with hook pairs and live interventions (`FeaturePatch`, `JointEdit`)
    together: each live one is prepared on the prompt and fed every chosen token."""
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
