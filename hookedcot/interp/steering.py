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

from jaxtyping import Float
from torch import Tensor

from hookedcot.interp.interventions import AddVector, ScaleDirection
from hookedcot.interp.positions import PositionSpec
from hookedcot.interp.renamed import renamed

HookPair = tuple[str, Any]


def add_vector(name: str, v: Float[Tensor, "..."], alpha: float = 1.0, positions: PositionSpec = None) -> HookPair:
    """x + α·v at the selected positions of hook `name` (α·v formed in float32, then cast to the
    activation's dtype before the add). The function is an `AddVector` intervention: declarative,
    so generation keeps its fast path (`hookedcot.fast_decode`)."""
    return name, AddVector(v, alpha, positions)


def scale_direction(name: str, v: Float[Tensor, " d"], factor: float, positions: PositionSpec = None) -> HookPair:
    """Scale the component of x along v̂ = v/‖v‖ by `factor`: x + (factor − 1)(x·v̂) v̂ on the last
    axis, in float32. factor = 1 is the identity, 0 ablates the direction, −1 reflects it. The
    function is a `ScaleDirection` intervention (declarative)."""
    return name, ScaleDirection(v, factor, positions)


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
