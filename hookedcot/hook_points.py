"""Hook dispatch: cheap when nobody listens, scoped to the call that added the hook.

Two kinds of hooks:
- *persistent* hooks (`model.add_hook`) stay until `model.reset_hooks()` and every thread sees them;
- *scoped* hooks (`run_with_hooks`, `run_with_cache`, `with model.hooks(...)`, `generate(fwd_hooks=)`)
  live in a `contextvars.ContextVar`: they vanish when their call returns or raises, and another
  thread running the same model never sees them. Each belongs to the model that installed it: a
  second model run inside the block (a diffing partner, a source of patched features) sees none.

At the start of each forward pass the two are merged once into a `HookRun`; each hook point then
costs one dict lookup when nothing listens. Everything a hook might need but the forward does not
(attention scores, per-head results) is only built when `HookRun.listens(name)` says so.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

import torch
from torch import Tensor

from hookedcot.hook_names import layer_of, suggest

HookFn = Callable[[Tensor, "Hook"], Union[Tensor, None]]
NameOrFilter = Union[str, Callable[[str], bool]]


class HookError(RuntimeError):
    """A hook misbehaved (wrong replacement shape/dtype) or was named wrongly."""


class HookNameError(KeyError, HookError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass
class Hook:
    """What a hook function receives beside the tensor: where it is and which positions it sees.

    `positions` are indices into the full sequence (prompt + generated so far) of the positions in
    this tensor; during generation with a KV cache a hook sees only the new positions, so
    `positions` tells it where they are (e.g. `x[:, hook.positions >= 37] += v`).
    `position_ids` are the rotary positions per row (they differ from `positions` in left-padded
    rows). `ctx` is a scratch dict that lives as long as this call's hooks."""

    name: str
    positions: Tensor
    position_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    ctx: dict[str, Any] = field(default_factory=dict)

    def layer(self) -> int | None:
        return layer_of(self.name)

    @property
    def past_len(self) -> int:
        return int(self.positions[0]) if len(self.positions) else 0


_SCOPED: contextvars.ContextVar[tuple[tuple[object, str, HookFn], ...]] = contextvars.ContextVar(
    "hookedcot_scoped_hooks", default=()
)


def resolve_hooks(
    fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]], valid_names: list[str]
) -> list[tuple[str, HookFn]]:
    """Expand (name_or_filter, fn) pairs into (name, fn) pairs, validating every name first so
    that a bad name attaches nothing."""
    valid = set(valid_names)
    resolved: list[tuple[str, HookFn]] = []
    for item in fwd_hooks:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise HookError(f"each hook must be a (name_or_filter, fn) pair, got {item!r}")
        name, fn = item
        if not callable(fn):
            raise HookError(f"the hook function for {name!r} is not callable: {fn!r}")
        if isinstance(name, str):
            if name not in valid:
                raise HookNameError(
                    f"unknown hook name {name!r}; the closest valid names are: "
                    + ", ".join(suggest(name, valid_names))
                    + ". model.hook_names() lists them all; get_act_name('resid_post', 3) builds one."
                )
            resolved.append((name, fn))
        elif callable(name):
            resolved.extend((n, fn) for n in valid_names if name(n))
        else:
            raise HookError(f"a hook name must be a string or a filter function, got {name!r}")
    return resolved


class scoped_hooks:
    """Context manager installing (name, fn) pairs on `owner` (a model), for the current
    thread/context only."""

    def __init__(self, hooks: list[tuple[str, HookFn]], owner: object):
        self.hooks = tuple((owner, name, fn) for name, fn in hooks)

    def __enter__(self) -> "scoped_hooks":
        _SCOPED.set(_SCOPED.get() + self.hooks)
        return self

    def __exit__(self, *exc: object) -> None:
        # Remove exactly this block's hooks (by identity): hooks the block's body removed with
        # `remove_scoped_hooks` stay removed, and an enclosing block's hooks stay put.
        mine = {id(h) for h in self.hooks}
        _SCOPED.set(tuple(h for h in _SCOPED.get() if id(h) not in mine))


def remove_scoped_hooks(owner: object, which: Callable[[HookFn], bool] | None = None) -> None:
    """Drop the scoped hooks `owner` holds in the current context (those `which(fn)` picks; all
    by default) — `model.reset_hooks()` inside a `with model.hooks(...)` block, as in
    TransformerLens; other threads' hooks are untouched."""
    _SCOPED.set(tuple(h for h in _SCOPED.get() if not (h[0] is owner and (which is None or which(h[2])))))


class HookRun:
    """The hooks active for one forward pass and the positions it covers."""

    __slots__ = ("active", "positions", "position_ids", "attention_mask", "ctx")

    def __init__(
        self,
        persistent: dict[str, list[HookFn]],
        positions: Tensor,
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
        owner: object = None,
    ):
        scoped = [(name, fn) for who, name, fn in _SCOPED.get() if who is owner]
        if scoped:
            active = {name: list(fns) for name, fns in persistent.items()}
            for name, fn in scoped:
                active.setdefault(name, []).append(fn)
        else:
            active = persistent
        self.active = active
        self.positions = positions
        self.position_ids = position_ids
        self.attention_mask = attention_mask
        self.ctx: dict[str, Any] = {}

    def listens(self, name: str) -> bool:
        return name in self.active

    def __call__(self, name: str, x: Tensor) -> Tensor:
        """Run every hook on `name` (if any) and return the possibly replaced tensor."""
        fns = self.active.get(name)
        if not fns:
            return x
        hook = Hook(name, self.positions, self.position_ids, self.attention_mask, self.ctx)
        for fn in fns:
            out = fn(x, hook)
            if out is None:
                continue
            if not isinstance(out, Tensor):
                raise HookError(f"hook on {name!r} returned {type(out).__name__}; return a Tensor or None")
            if out.shape != x.shape or out.dtype != x.dtype:
                raise HookError(
                    f"hook on {name!r} returned a tensor of shape {tuple(out.shape)} and dtype {out.dtype}; "
                    f"expected shape {tuple(x.shape)} and dtype {x.dtype} (the activation it replaces)"
                )
            if out.device != x.device:
                raise HookError(f"hook on {name!r} returned a tensor on {out.device}; expected {x.device}")
            x = out
        return x


def no_positions(device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)
