"""Steering as hook builders: add a vector, or scale the component along a direction.

    v = cache["resid_post", 12][0, -1] - other_cache["resid_post", 12][0, -1]
    steer = add_vector("blocks.12.hook_resid_post", v, alpha=4.0, positions="from 37")
    text = generate_steered(model, prompt, [steer], max_new_tokens=128)

Positions are absolute sequence indices matched against `hook.positions`, so the same hook steers
a plain forward pass and every step of KV-cached generation (`"from N"` = only what is generated
after a prompt of N tokens; every form in `positions.py`). Entries outside the selected positions
are returned bit-for-bit unchanged, and α = 0 (or factor = 1) is the exact identity: the hook
returns None and the model runs as if it were absent.

`v` is broadcast against the hook's trailing axes: [d_model] for residual hooks, [d_mlp] for
`mlp.hook_post`, [n_heads, d_head] (or [d_head]) for `attn.hook_z`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hookedcot.interp.positions import PositionSpec, Selection
from hookedcot.interp.renamed import renamed

HookPair = tuple[str, Any]


def add_vector(name: str, v: Float[Tensor, "..."], alpha: float = 1.0, positions: PositionSpec = None) -> HookPair:
    """x + α·v at the selected positions of hook `name` (α·v formed in float32, then cast to the
    activation's dtype before the add)."""
    sel = Selection(positions)
    vec = torch.as_tensor(v).detach().float()
    scaled: dict[tuple, Tensor] = {}

    def hook_fn(x: Tensor, hook: Any) -> Tensor | None:
        if alpha == 0:
            return None
        key = (x.device, x.dtype)
        if key not in scaled:
            scaled[key] = (alpha * vec).to(x.device, x.dtype)
        delta = scaled[key]
        mask = sel.mask(x, hook)
        return x + delta if mask is None else torch.where(mask, x + delta, x)

    return name, hook_fn


def scale_direction(name: str, v: Float[Tensor, " d"], factor: float, positions: PositionSpec = None) -> HookPair:
    """Scale the component of x along v̂ = v/‖v‖ by `factor`: x + (factor − 1)(x·v̂) v̂ on the last
    axis, in float32. factor = 1 is the identity, 0 ablates the direction, −1 reflects it."""
    unit = torch.as_tensor(v).detach().float().reshape(-1)
    norm = torch.linalg.vector_norm(unit)
    if norm == 0 or not torch.isfinite(norm):
        raise ValueError("the direction vector must be non-zero and finite")
    unit = unit / norm
    sel = Selection(positions)

    def hook_fn(x: Tensor, hook: Any) -> Tensor | None:
        if factor == 1:
            return None
        u = unit.to(x.device)
        xf = x.float()
        edited = (xf + (factor - 1) * (xf @ u)[..., None] * u).to(x.dtype)
        mask = sel.mask(x, hook)
        return edited if mask is None else torch.where(mask, edited, x)

    return name, hook_fn


def generate_steered(
    model: Any, prompt: str | Sequence[str] | Tensor, hooks: HookPair | Sequence[HookPair], **gen_kwargs: Any
) -> Any:
    """`model.generate(prompt, fwd_hooks=hooks, **gen_kwargs)`; `hooks` is one (name, fn) pair or a
    list. The hooks belong to this call only (gone when it returns or raises). Extra `fwd_hooks=`
    in gen_kwargs run before the steering hooks."""
    pairs = [hooks] if isinstance(hooks, tuple) and len(hooks) == 2 and isinstance(hooks[0], str) else list(hooks)
    extra = list(gen_kwargs.pop("fwd_hooks", ()))
    return model.generate(prompt, fwd_hooks=extra + pairs, **gen_kwargs)


steer_generate = renamed(generate_steered, "steer_generate")
