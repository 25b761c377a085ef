"""Hook dispatch: cheap when nobody listens, scoped to the call that added the hook.

Two kinds of hooks:
- *persistent* hooks (`model.add_hook`) stay until `model.reset_hooks()` and every thread sees them;
- *scoped* hooks (`run_with_hooks`, `run_with_cache`, `with model.hooks(...)`, `generate(fwd_hooks=)`)
  live in a `contextvars.ContextVar`: they vanish when their call returns or raises, and another
  thread running the same model never sees them. Each belongs to the model that installed it: a
  second model run inside the block (a diffing partner, a source of patched features) sees none.

A call that takes hooks (`run_with_hooks`, `run_with_cache`, `generate`) runs in a copy of the
caller's context (`in_own_context`), so its hooks exist in that copy only and nothing has to remove
them: an exception or a Ctrl-C landing anywhere, even inside the cleanup, leaves the caller's
context as it was. A `with model.hooks(...)` block runs its body in the caller's context, so it
removes its hooks on exit, finishing the removal before re-raising an interrupt that lands in it.

At the start of each forward pass the two are merged once into a `HookRun`; each hook point then
costs one dict lookup when nothing listens. Everything a hook might need but the forward does not
(attention scores, per-head results) is only built when `HookRun.listens(name)` says so.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

import torch
from torch import Tensor

from hookedcot.errors import HookedCoTError
from hookedcot.hook_names import layer_of, suggest

HookFn = Callable[[Tensor, "Hook"], Union[Tensor, None]]
NameOrFilter = Union[str, Callable[[str], bool]]


class HookError(HookedCoTError, RuntimeError):
    """A hook misbehaved (wrong replacement shape/dtype) or was named wrongly."""


class HookNameError(KeyError, HookError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class NonFiniteError(HookError):
    """With `model.check_finite = True`: a hook turned a finite activation into NaN or inf."""


# TransformerLens hook names with no hookedcot counterpart of that name: what to hook instead.
_TL_ONLY = (
    (re.compile(r"^hook_pos_embed$"), "rotary models have no positional embedding; positions enter through "
     "rotary, after blocks.L.attn.hook_q / hook_k (blocks.L.attn.hook_rot_q / hook_rot_k)"),
    (re.compile(r"^hook_tokens$"), "hookedcot has no token hook: edit the token ids before the call, or hook "
     "hook_embed (the embeddings)"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_in$"), "TransformerLens' per-head copy of the attention's input "
     "(use_attn_in) is split here: blocks.{0}.hook_q_input (per query head), hook_k_input and hook_v_input "
     "(per key/value head), or blocks.{0}.hook_resid_pre for all of them"),
)


def _tl_hint(name: str) -> str:
    for pattern, hint in _TL_ONLY:
        match = pattern.match(name)
        if match:
            return " (" + hint.format(*match.groups()) + ")"
    return ""


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
                    f"unknown hook name {name!r}{_tl_hint(name)}; the closest valid names are: "
                    + ", ".join(suggest(name, valid_names))
                    + ". model.hook_names() lists them all; get_act_name('resid_post', 3) builds one."
                )
            resolved.append((name, fn))
        elif callable(name):
            resolved.extend((n, fn) for n in valid_names if name(n))
        else:
            raise HookError(f"a hook name must be a string or a filter function, got {name!r}")
    return resolved


def in_own_context(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a copy of the current context: scoped hooks it installs vanish
    with the copy, whatever way it ends."""
    return contextvars.copy_context().run(fn, *args, **kwargs)


class scoped_hooks:
    """Context manager installing (name, fn) pairs on `owner` (a model) for the current
    thread/context only; `with ... as m` gives the owner.

    A class, not a generator-based context manager: an interrupt delivered as a generator resumes
    at its `yield` skips the `with` around the yield (found by tests/test_interrupts.py), which left
    the hooks attached. An interrupt inside `__enter__` or `__exit__` is raised once the install is
    undone / the removal is done."""

    def __init__(self, hooks: list[tuple[str, HookFn]], owner: object):
        self.hooks = tuple((owner, name, fn) for name, fn in hooks)
        self.owner = owner

    def __enter__(self) -> Any:
        try:
            _SCOPED.set(_SCOPED.get() + self.hooks)
            return self.owner
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self._remove()
        except BaseException:  # interrupted while removing: finish, then raise the interrupt
            self._remove()
            raise

    def _remove(self) -> None:
        # Exactly this block's hooks (by identity): hooks the block's body removed with
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

    __slots__ = ("active", "positions", "position_ids", "attention_mask", "ctx", "check_finite")

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
        self.check_finite = bool(getattr(owner, "check_finite", False))

    def listens(self, name: str) -> bool:
        return name in self.active

    def __call__(self, name: str, x: Tensor) -> Tensor:
        """Run every hook on `name` (if any) and return the possibly replaced tensor."""
        fns = self.active.get(name)
        if not fns:
            return x
        hook = Hook(name, self.positions, self.position_ids, self.attention_mask, self.ctx)
        check = self.check_finite and _finite(name, x)  # blame a hook only for what it produced
        for fn in fns:
            out = fn(x, hook)
            if out is None:
                if check and not _finite(name, x):  # edited in place
                    raise _non_finite(name, fn, x)
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
            if check and not _finite(name, out):
                raise _non_finite(name, fn, out)
            x = out
        return x


def _finite(name: str, x: Tensor) -> bool:
    """No NaN and no inf; attention scores may hold -inf (that is how a position is masked)."""
    if name.endswith("hook_attn_scores"):
        return not bool((x.isnan() | (x == float("inf"))).any())
    return bool(torch.isfinite(x).all())


def _non_finite(name: str, fn: HookFn, x: Tensor) -> NonFiniteError:
    user_fn = getattr(fn, "fn", fn)  # persistent and backward hooks wrap the user's function
    label = getattr(user_fn, "__qualname__", None) or repr(user_fn)
    return NonFiniteError(
        f"hook {label} on {name!r} turned a finite activation into {int(x.isnan().sum())} NaN and "
        f"{int(x.isinf().sum())} inf values (of {x.numel()}); it is the first hook of this forward to do so "
        "(model.check_finite = True is on; set it to False to run unchecked)"
    )


def no_positions(device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)


# --- TransformerLens' standalone HookPoint --------------------------------------------------------
# For code written against `transformer_lens.hook_points` (its own nn.Modules wrapping activations in
# HookPoints). It is not on HookedCoT's forward path: the model dispatches through `HookRun` above,
# and `model.hook_dict[name]` is `hookedcot.hooked.HookPoint`, a view onto that dispatch.


@dataclass
class LensHandle:
    """A torch hook handle with TransformerLens' bookkeeping (as in `transformer_lens.hook_points`)."""

    hook: Any  # torch.utils.hooks.RemovableHandle
    is_permanent: bool = False
    context_level: int | None = None
    user_hook: Callable | None = None


class BaseTensorConversion:
    """TransformerLens' hook conversion: `convert` before a HookPoint's hook sees the activation,
    `revert` on what the hook returns (see `HookPoint.enable_reshape`)."""

    def __init__(self, input_filter: Callable | None = None, output_filter: Callable | None = None):
        self.input_filter, self.output_filter = input_filter, output_filter

    def convert(self, input_value, *full_context):
        if self.input_filter is not None:
            input_value = self.input_filter(input_value)
        output = self.handle_conversion(input_value, *full_context)
        return self.output_filter(output) if self.output_filter is not None else output

    def handle_conversion(self, input_value, *full_context):
        raise NotImplementedError(f"The conversion function for {type(self).__name__} needs to be implemented.")

    def revert(self, input_value, *full_context):
        return input_value


_DIRS = ("fwd", "bwd", "both")


class HookPoint(torch.nn.Module):
    """TransformerLens' HookPoint: an identity module whose `add_hook(fn)` registers a torch
    forward (or full backward) hook calling `fn(activation, hook=self)`; a returned tensor replaces
    the activation (the gradient, for `dir="bwd"`). `fwd_hooks`/`bwd_hooks` hold `LensHandle`s."""

    def __init__(self):
        super().__init__()
        self.fwd_hooks: list[LensHandle] = []
        self.bwd_hooks: list[LensHandle] = []
        self.ctx: dict = {}
        self.name: str | None = None  # set by the root module
        self.hook_conversion: BaseTensorConversion | None = None

    def __repr__(self) -> str:
        bits = [f"name={self.name!r}"] if self.name is not None else []
        if self.fwd_hooks:
            bits.append(f"{len(self.fwd_hooks)} fwd")
        if self.bwd_hooks:
            bits.append(f"{len(self.bwd_hooks)} bwd")
        return f"HookPoint({', '.join(bits)})"

    def add_perma_hook(self, hook: Callable, dir: str = "fwd") -> None:
        self.add_hook(hook, dir=dir, is_permanent=True)

    def add_hook(self, hook: Callable, dir: str = "fwd", is_permanent: bool = False,
                 level: int | None = None, prepend: bool = False) -> None:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"Invalid direction {dir}")

        def full_hook(module: torch.nn.Module, module_input: Any, module_output: Any):
            if dir == "bwd":  # a full backward hook gets grad_output as a tuple (grad,)
                module_output = module_output[0]
            if self.hook_conversion is not None:
                module_output = self.hook_conversion.convert(module_output)
            result = hook(module_output, hook=self)
            if result is not None and self.hook_conversion is not None:
                result = self.hook_conversion.revert(result)
            if dir == "bwd" and result is not None and not isinstance(result, tuple):
                result = (result,)  # torch wants the new grad_input as a tuple
            return result

        # partial.__repr__ can be slow on large bound arguments (cached tensors)
        func = getattr(hook, "func", None)
        full_hook.__name__ = f"partial({func!r},...)" if func is not None else repr(hook)
        if dir == "fwd":
            pt_handle = self.register_forward_hook(full_hook, prepend=prepend)
            handles = self.fwd_hooks
        else:
            pt_handle = self.register_full_backward_hook(full_hook, prepend=prepend)
            handles = self.bwd_hooks
        handle = LensHandle(pt_handle, is_permanent, level, user_hook=hook)
        if prepend:
            handles.insert(0, handle)
        else:
            handles.append(handle)

    def has_hooks(self, dir: str = "both", including_permanent: bool = True, level: int | None = None) -> bool:
        """Whether any hook of direction `dir` (at context `level`, if given) is attached."""
        if dir not in _DIRS:
            raise ValueError(f"Invalid direction {dir}")

        def any_in(handles: list[LensHandle]) -> bool:
            return any((including_permanent or not h.is_permanent) and (level is None or h.context_level == level)
                       for h in handles)

        return ((dir != "bwd" and any_in(self.fwd_hooks)) or (dir != "fwd" and any_in(self.bwd_hooks)))

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None) -> None:
        """Remove hooks of direction `dir`: all of them if `including_permanent`, else the
        non-permanent ones (at context `level`, if given)."""
        if dir not in _DIRS:
            raise ValueError(f"Invalid direction {dir}")

        def keep(handles: list[LensHandle]) -> list[LensHandle]:
            kept = []
            for h in handles:
                if including_permanent or (not h.is_permanent and (level is None or h.context_level == level)):
                    h.hook.remove()
                else:
                    kept.append(h)
            return kept

        if dir in ("fwd", "both"):
            self.fwd_hooks = keep(self.fwd_hooks)
        if dir in ("bwd", "both"):
            self.bwd_hooks = keep(self.bwd_hooks)

    def clear_context(self) -> None:
        self.ctx = {}

    def enable_reshape(self, hook_conversion: BaseTensorConversion | None = None) -> None:
        """Hooks see `hook_conversion.convert(activation)`; what they return goes through `revert`."""
        self.hook_conversion = hook_conversion

    def forward(self, x: Tensor) -> Tensor:
        return x

    def layer(self) -> int:
        """The layer of a name `blocks.{layer}.…`; raises if the name has no such form."""
        if self.name is None:
            raise ValueError("Name cannot be None")
        return int(self.name.split(".")[1])
