"""Declarative interventions: hook functions that are pure tensor operations.

Each object here is a hook function, `(x, hook) -> Tensor | None`, and works wherever one does
(`fwd_hooks=`, `with model.hooks(...)`, `run_with_hooks`, `generate`), giving the same numbers as
the closure a user would write. What makes them *declarative*: their parameters are tensors held
by the object, their shapes are fixed when they are built, and applying one (`edit(x, name,
positions)`) reads no Python number from a tensor. So a decode loop can run them inside a
captured or compiled step (`hookedcot.fast_decode`), where an arbitrary Python hook cannot live.

    steer = AddVector(v, alpha=4.0, positions="from 37")
    model.generate(prompt, fwd_hooks=[("blocks.12.hook_resid_post", steer)])   # the fast path

| object | edit at the selected entries | builder |
|---|---|---|
| `AddVector(v, alpha)` | x + α·v | `add_vector` |
| `ScaleDirection(v, factor)` | x + (factor − 1)(x·v̂)v̂ | `scale_direction`, `ablate_direction` |
| `SetValue(value)` | value (0: zero ablation) | `ablate_zero`, `ablate_heads`, `ablate_neurons` |
| `MeanFill(mean, per_position)` | a precomputed mean | `ablate_mean` |
| `Clamp(min, max)` | x clamped | — |
| `ReplaceFrom(stored, rows)` | a stored activation at the same absolute position | `ablate_resample` |
| `Record(buffer)` | nothing: x is written into `buffer` at its positions | — |

Where an edit applies is a `Where` of positions (the grammar of `positions.py`, except a
callable, which runs Python: such an intervention still works as a hook but is not declarative),
heads and units. Entries outside it are returned bit-for-bit unchanged. Call `.to(device)` to move
the parameters once (otherwise the first call on another device moves them).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hookedcot.interp.positions import Positions, PositionSpec, head_axis, position_axis

Index = Sequence[int] | int | None


def _ints(index: Index, what: str) -> list[int] | None:
    if index is None:
        return None
    if isinstance(index, Tensor):
        index = index.reshape(-1).tolist()
    items = [index] if isinstance(index, int) else list(index)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"{what} must be ints, got {index!r}")
    return items


class Where:
    """Positions × heads × units an edit applies to; `mask(x, name, positions)` is a bool tensor
    broadcastable to x, or None for everywhere. Built from tensors only: "last N" and negative
    indices read the sequence length as a tensor (`positions[-1] + 1`), never as a Python int."""

    def __init__(self, positions: PositionSpec = None, heads: Index = None, units: Index = None):
        self.positions = positions if isinstance(positions, Positions) else Positions(positions)
        self.heads, self.units = _ints(heads, "heads"), _ints(units, "neurons/units")
        self.declarative = self.positions.kind != "callable"
        self.wanted = self.positions.wanted.clone() if self.positions.kind == "index" else None

    def to(self, device: torch.device | str) -> "Where":
        if self.wanted is not None:
            self.wanted = self.wanted.to(device)
        return self

    def mask(self, x: Tensor, name: str, positions: Tensor) -> Tensor | None:
        mask = None
        for axis, sel in self._parts(x, name, positions):
            view = [1] * x.dim()
            view[axis] = sel.shape[0]
            sel = sel.view(view)
            mask = sel if mask is None else mask & sel
        return mask

    def _parts(self, x: Tensor, name: str, positions: Tensor):
        if not self.positions.all:
            axis = position_axis(name)
            if axis is None:
                raise ValueError(f"{name} has no position axis; drop positions=")
            yield axis, self.position_mask(positions.to(x.device))
        if self.heads is not None:
            axis = head_axis(name)
            if axis is None:
                raise ValueError(f"{name} has no head axis (heads live in hook_q/k/v/z/result/pattern/scores)")
            yield axis, _index_mask(self.heads, x.shape[axis], "head", name, x.device)
        if self.units is not None:
            yield x.dim() - 1, _index_mask(self.units, x.shape[-1], "unit", name, x.device)

    def position_mask(self, positions: Tensor) -> Tensor:
        """Bool [p]: which of these absolute positions the spec selects (`Positions` semantics)."""
        spec = self.positions
        if spec.kind == "callable":  # Python on the positions: a hook, not declarative
            return spec(positions)
        if positions.numel() == 0:
            return torch.zeros_like(positions, dtype=torch.bool)
        length = positions[-1:] + 1  # [1]: the sequence so far, as a tensor
        if spec.kind == "from":
            return positions >= spec.a
        if spec.kind == "last":
            return positions >= length - spec.a
        if spec.kind == "index":
            wanted = self.wanted if self.wanted.device == positions.device else self.wanted.to(positions.device)
            if spec.has_negative:
                wanted = torch.where(wanted < 0, wanted + length, wanted)
            return torch.isin(positions, wanted)
        start = (spec.a + length).clamp(min=0) if spec.a < 0 else spec.a  # slice
        mask = (positions >= start) & ((positions - start) % spec.step == 0)
        if spec.b is not None:
            mask = mask & (positions < (spec.b + length if spec.b < 0 else spec.b))
        return mask


def _index_mask(index: list[int], size: int, what: str, name: str, device: torch.device) -> Tensor:
    """Bool [size], True at `index`; range checked on Python ints (shapes are static)."""
    bad = [i for i in index if not -size <= i < size]
    if bad:
        raise ValueError(f"{what} index {bad} out of range for {name} (size {size})")
    return torch.zeros(size, dtype=torch.bool, device=device).index_fill_(
        0, torch.tensor([i % size for i in index], dtype=torch.long, device=device), True)


class Intervention:
    """Base of the declarative interventions: a hook function whose work is `edit`, tensor ops
    only. `declarative` is False when something in it needs Python per call (a callable position
    spec); the object still works as a hook, and generation then runs eagerly."""

    where: Where

    @property
    def declarative(self) -> bool:
        return self.where.declarative

    def __call__(self, x: Tensor, hook: Any) -> Tensor | None:
        return self.edit(x, hook.name, hook.positions)

    def edit(self, x: Tensor, name: str, positions: Tensor) -> Tensor | None:
        """The edited activation (or None: unchanged). `positions`: absolute indices [p]."""
        raise NotImplementedError(f"{type(self).__name__} must define edit(x, name, positions)")

    def tensors(self) -> dict[str, Tensor]:
        """The parameters (attribute name -> tensor) `to` moves."""
        return {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}

    def structure(self) -> tuple:
        """What a compiled decode step bakes in as constants: the kind, every plain setting (a
        factor, a fill value, the position / head / unit selection) and the tensors' shapes and
        dtypes. Tensor values are read at run time, so a new vector of the same shape shares it."""
        where = self.where
        plain = tuple(sorted((k, repr(v)) for k, v in vars(self).items() if not isinstance(v, (Tensor, Where))))
        tensors = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(self.tensors().items()))
        wanted = None if where.wanted is None else tuple(where.wanted.shape)
        return (type(self).__name__, plain, tensors, repr(where.positions.spec), wanted,
                None if where.heads is None else tuple(where.heads), None if where.units is None else tuple(where.units))

    def to(self, device: torch.device | str) -> "Intervention":
        for key, value in self.tensors().items():
            setattr(self, key, value.to(device))
        self.where.to(device)
        return self

    def _on(self, key: str, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Parameter `key` on x's device (and `dtype`), moved once and kept (not per call)."""
        t = getattr(self, key)
        if t.device != x.device or (dtype is not None and t.dtype != dtype):
            t = t.to(x.device, dtype if dtype is not None else t.dtype)
            setattr(self, key, t)
        return t

    def _select(self, x: Tensor, edited: Tensor, name: str, positions: Tensor) -> Tensor:
        mask = self.where.mask(x, name, positions)
        return edited if mask is None else torch.where(mask, edited, x)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors().items())
        return f"{type(self).__name__}({shapes}, positions={self.where.positions.spec!r})"


class AddVector(Intervention):
    """x + α·v at the selected positions; α·v is formed in float32 once, then cast to the
    activation's dtype before the add. α = 0 is the exact identity (returns None)."""

    def __init__(self, v: Float[Tensor, "..."], alpha: float = 1.0, positions: PositionSpec = None):
        self.where = Where(positions)
        self.identity = float(alpha) == 0
        self.delta = (float(alpha) * torch.as_tensor(v).detach().float())

    def edit(self, x: Tensor, name: str, positions: Tensor) -> Tensor | None:
        if self.identity:
            return None
        return self._select(x, x + self._on("delta", x, x.dtype), name, positions)


class ScaleDirection(Intervention):
    """Scale the component of x along v̂ = v/‖v‖ by `factor` on the last axis, in float32:
    x + (factor − 1)(x·v̂)v̂. factor = 1 is the identity (returns None), 0 ablates the direction."""

    def __init__(self, v: Float[Tensor, " d"], factor: float, positions: PositionSpec = None):
        unit = torch.as_tensor(v).detach().float().reshape(-1)
        norm = torch.linalg.vector_norm(unit)
        if norm == 0 or not torch.isfinite(norm):
            raise ValueError("the direction vector must be non-zero and finite")
        self.unit, self.factor, self.where = unit / norm, float(factor), Where(positions)

    def edit(self, x: Tensor, name: str, positions: Tensor) -> Tensor | None:
        if self.factor == 1:
            return None
        u = self._on("unit", x)
        xf = x.float()
        edited = (xf + (self.factor - 1) * (xf @ u)[..., None] * u).to(x.dtype)
        return self._select(x, edited, name, positions)


class SetValue(Intervention):
    """The selected entries become `value` (0: zero ablation of positions, heads or neurons)."""

    def __init__(self, value: float = 0.0, positions: PositionSpec = None, heads: Index = None, units: Index = None):
        self.value, self.where = float(value), Where(positions, heads, units)

    def edit(self, x: Tensor, name: str, positions: Tensor) -> Tensor:
        mask = self.where.mask(x, name, positions)
        if mask is None:
            return torch.full_like(x, self.value)
        return x.masked_fill(mask, self.value)


class Clamp(Intervention):
    """The selected entries clamped to [min, max] (either may be None)."""

    def __init__(self, min: float | None = None, max: float | None = None, positions: PositionSpec = None,
                 heads: Index = None, units: Index = None):
        if min is None and max is None:
            raise ValueError("Clamp needs min=, max= or both")
        self.min, self.max, self.where = min, max, Where(positions, heads, units)

    def edit(self, x: Tensor, name: str, positions: Tensor) -> Tensor:
        return self._select(x, x.clamp(self.min, self.max), name, positions)


class MeanFill(Intervention):
    """The selected entries become a precomputed mean (float32, cast to the activation's dtype):
    one shaped like a position ([d], [h, k], ...), or with `per_position` one per absolute position
    [P, ...], positions from P on taking `overall` (default: the mean over P)."""

    def __init__(self, mean: Tensor, per_position: bool = False, positions: PositionSpec = None,
                 heads: Index = None, units: Index = None, overall: Tensor | None = None):
        self.mean = mean.detach().float()
        self.per_position = per_position
        self.overall = (overall if overall is not None else self.mean.mean(0) if per_position else self.mean).float()
        self.where = Where(positions, heads, units)

    def edit(self, x: Tensor, name: str, positions: Tensor) -> Tensor:
        mean = self._on("mean", x)
        if self.per_position:
            overall = self._on("overall", x)
            pos = positions.to(x.device)
            inside = (pos < mean.shape[0]).reshape(-1, *([1] * (mean.dim() - 1)))
            fill = torch.where(inside, mean[pos.clamp(max=mean.shape[0] - 1)], overall)
        else:
            fill = mean
        fill = fill.to(x.dtype).expand_as(x)
        mask = self.where.mask(x, name, positions)
        return fill.clone() if mask is None else torch.where(mask, fill, x)


class ReplaceFrom(Intervention):
    """The selected entries become a stored activation at the same absolute position: `stored`
    [n, P, ...] (a run's `cache[name]`), batch row i reading stored row `rows[i % len(rows)]`
    (default: row i % n). Called as a hook, a position at or past P is an error (nothing to replace
    it with); inside a compiled step, where no error can be raised, such positions are left as
    they are."""

    def __init__(self, stored: Tensor, rows: Tensor | Sequence[int] | None = None, positions: PositionSpec = None,
                 heads: Index = None, units: Index = None):
        self.stored = stored.detach()
        self.rows = torch.as_tensor(rows if rows is not None else range(stored.shape[0]), dtype=torch.long)
        self.where = Where(positions, heads, units)

    def __call__(self, x: Tensor, hook: Any) -> Tensor:
        pos = hook.positions
        if len(pos) and int(pos.max()) >= self.stored.shape[1]:
            raise ValueError(f"ReplaceFrom on {hook.name}: position {int(pos.max())} is past the stored activation's "
                             f"length {self.stored.shape[1]}; restrict positions= or store a longer run")
        return self.edit(x, hook.name, pos)

    def edit(self, x: Tensor, name: str, positions: Tensor) -> Tensor:
        if position_axis(name) != 1:
            raise ValueError(f"ReplaceFrom needs a [batch, pos, ...] hook; {name} is not one")
        stored, rows = self._on("stored", x), self._on("rows", x)
        pos = positions.to(x.device)
        n_stored = stored.shape[1]
        picked = rows[torch.arange(x.shape[0], device=x.device) % rows.shape[0]]
        fill = stored[picked][:, pos.clamp(max=n_stored - 1)].to(x.dtype)
        mask = self.where.mask(x, name, positions)
        inside = (pos < n_stored).view(1, -1, *([1] * (x.dim() - 2)))
        mask = inside if mask is None else mask & inside
        return torch.where(mask, fill, x)


class Record(Intervention):
    """Write the activation into a preallocated `buffer` [b, capacity, ...] at its absolute
    positions (a cache that lives in a compiled step: no list to append to, no new tensor per
    step). Leaves the activation unchanged. Build the buffer with `Record.for_hook`."""

    def __init__(self, buffer: Tensor):
        self.buffer, self.where = buffer, Where()

    @staticmethod
    def for_hook(model: Any, name: str, batch: int, capacity: int, dtype: torch.dtype | None = None) -> "Record":
        """A zeroed buffer shaped for hook `name` of `model`: [batch, capacity, *trailing axes]."""
        from hookedcot.hook_names import spec_of

        sizes = {"d": model.cfg.d_model, "h": model.cfg.n_heads, "g": model.cfg.n_key_value_heads,
                 "k": model.cfg.d_head, "m": model.cfg.d_mlp, "1": 1}
        letters = spec_of(name).shape.split()
        if letters[:2] != ["b", "p"]:
            raise ValueError(f"Record needs a [batch, pos, ...] hook; {name} is [{' '.join(letters)}]")
        shape = (batch, capacity, *(sizes[c] for c in letters[2:]))
        return Record(torch.zeros(shape, dtype=dtype or model.dtype, device=model.device))

    def to(self, device: torch.device | str) -> "Record":
        raise ValueError("a Record writes into the buffer you hold: build it on the right device instead of moving it")

    def edit(self, x: Tensor, name: str, positions: Tensor) -> None:
        if position_axis(name) != 1:
            raise ValueError(f"Record needs a [batch, pos, ...] hook; {name} is not one")
        if self.buffer.device != x.device:
            raise ValueError(f"Record's buffer is on {self.buffer.device} but {name} runs on {x.device}")
        self.buffer.index_copy_(1, positions.to(x.device), x.to(self.buffer.dtype))
        return None
