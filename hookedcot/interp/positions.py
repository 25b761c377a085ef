"""The one position grammar of every interp tool, and which heads and units an edit touches.

Hook-function edits (ablation, steering, corruption) compile a spec with `Positions` and apply it
to whatever positions a hook sees; tools that run one prompt (sweeps, lens, tracing, iterative
patching) turn it into a list of indices with `resolve_positions`. Both accept the same forms.

A *position spec* names absolute sequence indices (prompt + generated so far, left padding
included), so one hook works the same in a full forward pass and during generation with a KV
cache, where a hook only sees the new positions (`hook.positions` says which they are):

| spec | selects |
|---|---|
| `None` / `"all"` | every position |
| `7`, `-1` | that position; negative counts from the end of the sequence so far (`-1` = the newest) |
| `[3, 4, 9]`, `range(3, 9)`, a LongTensor | those positions (`resolve_positions` keeps their order) |
| `slice(10, 20)` | positions 10..19 (negative bounds count from the end, as in Python) |
| `"from 37"` | position 37 and every later one (e.g. steer only the generated tokens) |
| `"last 5"` | the last 5 positions of the sequence so far |
| a callable | `fn(hook.positions) -> bool mask` (or a list of booleans) of the same length |
| `model.find_positions(tokens, "text")` | the positions of that text (a list of ints) |

The edit is applied where the spec selects and leaves every other entry bit-for-bit untouched.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

from hookedcot.hook_names import spec_of

PositionSpec = Union[None, int, str, slice, Sequence[int], Tensor, Callable[[Tensor], Any]]
HEAD_LETTERS = ("h", "g")  # query heads, key/value heads
POSITION_LETTERS = ("p", "q")  # sequence positions; queries for attention scores and patterns
ACCEPTED_FORMS = (
    "None or 'all', an int (negative counts from the end), a list/range/LongTensor of ints, a slice, "
    "'from N', 'last N', a callable fn(positions) -> bool mask, or a list from model.find_positions"
)


class Positions:
    """A position spec compiled once (when the hook is built); calling it on `hook.positions`
    gives a bool mask over them, or None for "all". Parsing and host-to-device copies happen
    here, not on every forward, and the sequence length is read only for negative/"last" specs."""

    def __init__(self, spec: PositionSpec):
        self.spec = spec
        self.all = spec is None or (isinstance(spec, str) and spec == "all")
        self.kind, self.a, self.b, self.step = "", 0, None, 1
        self._wanted: dict[torch.device, Tensor] = {}
        if self.all:
            return
        if isinstance(spec, str):
            parts = spec.split()
            if not (len(parts) == 2 and parts[0] in ("from", "last") and parts[1].isdigit()):
                raise ValueError(f"position spec {spec!r} is not understood; accepted forms: {ACCEPTED_FORMS}")
            self.kind, self.a = parts[0], int(parts[1])
        elif isinstance(spec, slice):
            self.kind, self.a, self.b, self.step = "slice", spec.start or 0, spec.stop, spec.step or 1
            if self.step <= 0:
                raise ValueError(f"position slices need a positive step, got {spec}")
        elif callable(spec) and not isinstance(spec, Tensor):
            self.kind = "callable"
        else:
            wanted = spec if isinstance(spec, Tensor) else torch.tensor(_ints(spec), dtype=torch.long)
            if wanted.dim() > 1 or wanted.is_floating_point() or wanted.is_complex() or wanted.dtype == torch.bool:
                raise ValueError(f"position spec {spec!r} is not understood; accepted forms: {ACCEPTED_FORMS}")
            self.kind, self.wanted = "index", wanted.reshape(-1).long().cpu()
            self.has_negative = bool((self.wanted < 0).any())

    def __call__(self, positions: Tensor) -> Tensor | None:
        if self.all:
            return None
        if self.kind == "from":
            return positions >= self.a
        if self.kind == "callable":
            mask = torch.as_tensor(self.spec(positions), device=positions.device)
            if mask.dtype != torch.bool or mask.shape != positions.shape:
                raise ValueError(
                    f"a position callable must return a bool mask of shape {tuple(positions.shape)} "
                    f"(one per position the hook sees), got dtype {mask.dtype} and shape {tuple(mask.shape)}"
                )
            return mask
        if self.kind == "index":
            wanted = self._wanted.get(positions.device)
            if wanted is None:
                wanted = self._wanted[positions.device] = self.wanted.to(positions.device)
            if self.has_negative:
                wanted = torch.where(wanted < 0, wanted + _length(positions), wanted)
            return torch.isin(positions, wanted)
        needs_length = self.kind == "last" or self.a < 0 or (self.b is not None and self.b < 0)
        length = _length(positions) if needs_length else 0
        if self.kind == "last":
            return positions >= length - self.a
        start = max(self.a + (length if self.a < 0 else 0), 0)  # as Python clamps a slice's start
        mask = (positions >= start) & ((positions - start) % self.step == 0)
        if self.b is not None:
            mask &= positions < self.b + (length if self.b < 0 else 0)
        return mask


def _ints(spec: Any) -> list[int]:
    """An int or an iterable of ints (numpy ints included; bools are not positions) as a list."""
    items = [spec] if isinstance(spec, int) or not isinstance(spec, Iterable) else list(spec)
    try:
        if any(isinstance(i, bool) for i in items):
            raise TypeError
        return [operator.index(i) for i in items]
    except TypeError:
        raise ValueError(f"position spec {spec!r} is not understood; accepted forms: {ACCEPTED_FORMS}") from None


def _length(positions: Tensor) -> int:
    """The length of the sequence so far (the newest position + 1)."""
    return int(positions[-1]) + 1 if len(positions) else 0


def resolve_positions(spec: PositionSpec, n_pos: int) -> list[int]:
    """The absolute positions of an `n_pos`-token prompt that `spec` selects: explicit ones in the
    order given, every other form in increasing order. Explicit positions outside the prompt are
    an error (a patch there would silently do nothing)."""
    compiled = spec if isinstance(spec, Positions) else Positions(spec)
    if compiled.kind == "index":
        wanted = compiled.wanted.tolist()
        if bad := [p for p in wanted if not -n_pos <= p < n_pos]:
            raise ValueError(f"positions {bad} fall outside the {n_pos}-token prompt (valid: {-n_pos}..{n_pos - 1})")
        return [p % n_pos for p in wanted]
    mask = compiled(torch.arange(n_pos))
    return list(range(n_pos)) if mask is None else mask.nonzero()[:, 0].tolist()


def metric_positions(spec: PositionSpec, n_pos: int) -> list[int]:
    """The positions a metric reads: each once, in increasing order, so patched rows and baselines
    are unembedded at the same positions in the same order."""
    return sorted(set(resolve_positions(spec, n_pos)))


def axis_of(name: str, letters: Sequence[str]) -> int | None:
    """The axis of hook `name` whose shape letter is one of `letters` (None if it has none)."""
    for i, letter in enumerate(spec_of(name).shape.split()):
        if letter in letters:
            return i
    return None


def head_axis(name: str) -> int | None:
    """The head axis of hook `name` (query or key/value heads), from its shape in the hook table."""
    return axis_of(name, HEAD_LETTERS)


def position_axis(name: str) -> int | None:
    """The position axis of hook `name` (the query axis for attention scores and patterns)."""
    return axis_of(name, POSITION_LETTERS)


class Selection:
    """Where an edit applies: positions × heads × units, compiled once when the hook is built.

    `mask(x, hook)` is a bool tensor broadcastable to `x` (None = everywhere). Positions index the
    hook's position axis (the query axis `q` for scores/patterns), heads its `h`/`g` axis, units
    its last axis (neurons of `mlp.hook_post`, dimensions of the residual). Head and unit masks
    are built once per device."""

    def __init__(self, positions: PositionSpec = None, heads: Sequence[int] | int | None = None,
                 units: Sequence[int] | int | None = None):
        self.positions = positions if isinstance(positions, Positions) else Positions(positions)
        self.heads = _int_list(heads, "heads")
        self.units = _int_list(units, "neurons/units")
        self._masks: dict[tuple, Tensor] = {}

    def mask(self, x: Tensor, hook: Any) -> Tensor | None:
        mask: Tensor | None = None
        for axis, sel in self._parts(x, hook):
            view = [1] * x.dim()
            view[axis] = sel.shape[0]
            sel = sel.view(view)
            mask = sel if mask is None else mask & sel
        return mask

    def _parts(self, x: Tensor, hook: Any):
        if not self.positions.all:
            axis = position_axis(hook.name)
            if axis is None:
                raise ValueError(f"{hook.name} has no position axis; drop positions=")
            sel = self.positions(hook.positions.to(x.device))
            if sel is not None:
                yield axis, sel
        if self.heads is not None:
            axis = head_axis(hook.name)
            if axis is None:
                raise ValueError(f"{hook.name} has no head axis (heads live in hook_q/k/v/z/result/pattern/scores)")
            yield axis, self._index_mask(self.heads, x.shape[axis], "head", hook.name, x.device)
        if self.units is not None:
            yield x.dim() - 1, self._index_mask(self.units, x.shape[-1], "unit", hook.name, x.device)

    def _index_mask(self, index: list[int], size: int, what: str, name: str, device: torch.device) -> Tensor:
        key = (what, size, device)
        if key not in self._masks:
            bad = [i for i in index if not -size <= i < size]
            if bad:
                raise ValueError(f"{what} index {bad} out of range for {name} (size {size})")
            sel = torch.zeros(size, dtype=torch.bool)
            sel[[i % size for i in index]] = True
            self._masks[key] = sel.to(device)
        return self._masks[key]


def _int_list(index: Any, what: str) -> list[int] | None:
    if index is None:
        return None
    if isinstance(index, Tensor):
        index = index.reshape(-1).tolist()
    items = [index] if isinstance(index, int) else list(index)
    if not all(isinstance(i, int) for i in items):
        raise ValueError(f"{what} must be ints, got {index!r}")
    return items
