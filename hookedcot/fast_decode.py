"""The decode step without Python hooks in it: a static KV cache, declarative interventions run
inside the step, and (optionally) the step compiled once per shape bucket.

Why: a decode step on the CPU is a few matrix-vector products per layer plus hundreds of small
ops and module calls; the small ops and the Python between them are a large share of the step
(README, Performance). A step whose shapes never change (`StaticKVCache`) and whose hooks are
tensor ops (`hookedcot.interp.interventions`) can be handed to `torch.compile` as one graph,
which fuses the small ops and drops the per-op Python. An arbitrary Python hook cannot live in
such a graph, so one anywhere sends generation to the eager loop, with a one-line notice.

Paths (`generate(..., decode=...)`):
- "eager": today's loop (`KVCache`, `HookRun`, every hook a Python call);
- "static": `StaticKVCache` + `StaticRun` (interventions called without building `Hook` objects),
  not compiled;
- "compiled": "static" with the step compiled by inductor (`torch.compile(fullgraph=True,
  dynamic=False)`), once per (batch, capacity bucket, hooks' structure); inside it the
  matrix-vector products are reductions (`kernels.gemv_by_reduction`) that read the weights near
  the memory bandwidth; the compile time is reported (`FastPathNotice`) and kept in
  `COMPILE_SECONDS`;
- "auto": "eager" when a hook is a Python function; else "compiled" when the step is already
  compiled for this shape, or when the generation may be long enough to repay a compile
  (`auto_compiles`); else "static".
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from hookedcot.hook_points import HookRun, no_positions
from hookedcot.kernels import GEMV_MAX_ROWS
from hookedcot.kv_cache import StaticKVCache

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT

PATHS = ("auto", "eager", "static", "compiled")
MIN_CAPACITY = 256  # compiled steps are shared by every generation whose prompt + new tokens fit a bucket:
# 256, 512, 1024, ... (powers of two: a handful of compiles covers every length, at the price of
# attending over at most twice the slots a generation needs)
AUTO_COMPILE_MIN_NEW_TOKENS = 2048  # "auto" compiles a new step shape for generations asking at least this many
COMPILE_SECONDS: dict[tuple, float] = {}  # compile time of each compiled (shape, hooks) key, this process
COMPILE_FAILED: dict[tuple, str] = {}  # why a key "auto" tried to compile failed: "auto" does not try it again


class FastPathNotice(UserWarning):
    """Generation left the fast path (a Python hook) or paid a compile; silence with
    `warnings.filterwarnings("ignore", category=FastPathNotice)`."""


class StaticRun:
    """`HookRun`'s surface for a static decode step: the active interventions by hook name, and
    the absolute positions of this step as a tensor (the cache's `input_pos`). Nothing here builds
    a Python object per hook call, so a compiler can trace through it."""

    def __init__(self, active: dict[str, list[Any]], positions: Tensor):
        self.active, self.positions = active, positions

    def listens(self, name: str) -> bool:
        return name in self.active

    def __call__(self, name: str, x: Tensor) -> Tensor:
        fns = self.active.get(name)
        if not fns:
            return x
        for fn in fns:
            out = fn.edit(x, name, self.positions)
            if out is not None:
                x = out
        return x


def active_hooks(model: "HookedCoT") -> dict[str, list[Any]]:
    """The forward hooks a forward of `model` would run here and now (persistent + this context's
    scoped ones), each unwrapped from its persistent wrapper."""
    active = HookRun(model._persistent, no_positions(), None, None, owner=model).active
    return {name: [getattr(fn, "fn", fn) if type(fn).__name__ == "_Persistent" else fn for fn in fns]
            for name, fns in active.items() if fns}


def first_python_hook(active: dict[str, list[Any]]) -> tuple[str, Any] | None:
    """The first hook that is not a declarative intervention (it needs Python per call), or None."""
    for name, fns in active.items():
        for fn in fns:
            if getattr(fn, "declarative", False) is not True or not callable(getattr(fn, "edit", None)):
                return name, fn
    return None


def choose_path(requested: str, model: "HookedCoT", active: dict[str, list[Any]], use_cache: bool,
                batch: int, capacity: int, max_new_tokens: int) -> str:
    """The path a generation takes. An explicit "static"/"compiled" with a Python hook, or
    without a cache, raises; "auto" falls back to "eager" then (with a notice naming the hook).
    "auto" otherwise takes "compiled" or "static" by `auto_compiles`."""
    if requested not in PATHS:
        raise ValueError(f"decode must be one of {PATHS}, got {requested!r}")
    if requested == "eager":
        return "eager"
    if getattr(model, "placement", None) is not None:  # split by a device_map: a static cache lives on one device
        if requested != "auto":
            raise ValueError(f"decode={requested!r} needs the model on one device, and this one is split over "
                             f"{len(model.placement.devices)} by its device_map; use decode='eager' or 'auto'")
        return "eager"
    if getattr(model, "check_finite", False) and active:  # the static step skips the per-hook check
        if requested != "auto":
            raise ValueError(f"decode={requested!r} does not run model.check_finite's per-hook check; use "
                             "decode='eager' or 'auto' while check_finite is on")
        return "eager"
    python_hook = first_python_hook(active)
    if python_hook is not None or not use_cache:
        why = ("use_cache=False" if not use_cache else
               f"hook {python_hook[1]!r} on {python_hook[0]!r} is a Python function, not a declarative intervention")
        if requested != "auto":
            raise ValueError(f"decode={requested!r} needs a KV cache and only declarative interventions "
                             f"(hookedcot.interp.interventions), but {why}; use decode='eager' or 'auto'")
        if python_hook is not None:
            warnings.warn(f"generate runs the eager decode loop: {why}", FastPathNotice, stacklevel=4)
        return "eager"
    if requested != "auto":
        return requested
    return "compiled" if auto_compiles(model, batch, capacity, active, max_new_tokens) else "static"


def bucket(n_positions: int) -> int:
    """The compiled cache's capacity for a generation of `n_positions` (prompt + new tokens)."""
    return max(MIN_CAPACITY, 1 << (max(n_positions, 1) - 1).bit_length())


def auto_compiles(model: "HookedCoT", batch: int, capacity: int, active: dict[str, list[Any]],
                  max_new_tokens: int) -> bool:
    """Whether "auto" takes the compiled step (after `choose_path` picked a fast path): when this
    process already compiled it for this key (free), or on the CPU when the generation asks for at
    least `AUTO_COMPILE_MIN_NEW_TOKENS` with at most `GEMV_MAX_ROWS` rows. Measured on the 2-core
    CPU, float32 (2026-11-30, steering on, batch 1): a compile costs 28–31 s with an empty inductor
    cache and 5.9–7.5 s once inductor's on-disk cache holds the graph (a later process, same
    shapes); the compiled step saves ~12 ms a token on SmolLM2 (13.0 against 25.2 ms) and ~17 ms
    on the Qwen2-0.5B shape (55.0 against 71.6). A cold compile is repaid after ~2,500 and ~1,700
    tokens, a warm one after ~550 and ~350; the request is an upper bound (eos may stop it
    early), so "auto" waits for 2,048 before paying a compile nobody asked for. On a GPU the
    compiled step is not measured yet: "auto" compiles there only a key compiled by request."""
    key = step_key(model, batch, capacity, active)
    if key in COMPILE_SECONDS:
        return True
    return (key not in COMPILE_FAILED and model.device.type == "cpu" and max_new_tokens >= AUTO_COMPILE_MIN_NEW_TOKENS
            and batch <= GEMV_MAX_ROWS)  # more rows: the products stay F.linear's, the saving is not measured


def step_key(model: "HookedCoT", batch: int, capacity: int, active: dict[str, list[Any]]) -> tuple:
    """What a compiled step depends on: the model, the shapes, and what each hook bakes in
    (`Intervention.structure`: kind, plain settings, parameter shapes). Two generations with one
    key run one graph; anything that differs would make dynamo recompile behind the key."""
    hooks = tuple((name, tuple(fn.structure() for fn in fns)) for name, fns in sorted(active.items()))
    return id(model), str(model.device), str(model.dtype), batch, bucket(capacity), hooks


def decode_step(model: "HookedCoT", run: StaticRun, tokens: Tensor, cache: StaticKVCache) -> Tensor:
    """One new position per row: tokens [b, 1] -> last-position logits [b, d_vocab]. Reads the
    cache's `input_pos` and `key_valid` (set by `FastStep`); compiled (the cache's `attend_all`
    on), no Python number changes per step; not compiled, attention spans `cache.end` slots."""
    position_ids = (cache.key_valid.sum(-1, keepdim=True) - 1).clamp(min=0)  # b 1: real tokens so far − 1
    from hookedcot.model import Transformer

    return Transformer.forward(model, tokens, run, position_ids, cache.key_valid, cache, last_logits_only=True)[:, -1]


def compiled_once(fn: Callable) -> Callable[[], Callable]:
    """A getter of `fn` compiled by inductor (one graph, static shapes), compiled on first use and
    kept: importing this module compiles nothing."""
    held: list[Callable] = []

    def get() -> Callable:
        if not held:
            held.append(torch.compile(fn, fullgraph=True, dynamic=False))
        return held[0]

    return get


def compile_limits():
    """Room for one graph per shape and hook structure (dynamo's default is 8 per function)."""
    return torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512)


_compiled = compiled_once(decode_step)


class FastStep:
    """The decode steps of one generation on a `StaticKVCache`: `prefill` runs the prompt through
    the model's ordinary forward (hooks as hook functions, positions 0..p−1), then each call runs
    one position through `decode_step`, compiled or not. With `fallback` (decode="auto"), a
    compile that fails (no C++ compiler, an op inductor cannot lower) leaves a notice and the
    generation runs the static step; by request, it raises."""

    def __init__(self, model: "HookedCoT", batch: int, capacity: int, active: dict[str, list[Any]], compiled: bool,
                 fallback: bool = False):
        self.model, self.compiled, self.fallback = model, compiled, fallback
        self.cache = StaticKVCache(model.cfg, batch, bucket(capacity) if compiled else capacity, model.dtype,
                                   model.device)
        self.cache.attend_all = False  # the prompt, and steps not compiled: attention sums as the dynamic cache's
        self.key = step_key(model, batch, capacity, active)
        self.active = active

    def prefill(self, forward: Callable[[], Tensor]) -> Tensor:
        """Run `forward()` (the prompt, through `model(...)` with `past_kv=self.cache`); after it the
        cache is driven by this object. The prompt's hook calls also move every intervention's
        parameters to the activation's device and dtype, so the step sees them in place."""
        logits = forward()
        cache = self.cache
        cache.key_valid.zero_()
        cache.key_valid[:, : cache.length] = self._prompt_valid
        cache.driven = True
        cache.attend_all = self.compiled  # a compiled step's shapes are the whole capacity
        self.run = StaticRun(self.active, cache.input_pos)
        return logits

    def set_prompt_mask(self, mask: Tensor) -> None:
        self._prompt_valid = mask.bool()

    def __call__(self, tokens: Tensor, position: int, valid: Tensor) -> Tensor:
        """Logits [b, d_vocab] after `tokens` [b, 1] at absolute `position`; `valid` [b] says
        which rows' token is real (finished rows write padding)."""
        cache = self.cache
        if position >= cache.max_len:
            raise ValueError(f"static KV cache holds {cache.max_len} positions; position {position} is past it")
        cache.input_pos.fill_(position)
        cache.key_valid[:, position] = valid
        cache.end = position + 1
        if not self.compiled:
            return decode_step(self.model, self.run, tokens, cache)
        new = self.key not in COMPILE_SECONDS
        start = time.perf_counter()
        try:  # a known key can still recompile (a guard dynamo adds that the key does not cover): same limits
            with compile_limits():
                logits = _compiled()(self.model, self.run, tokens, cache)
        except Exception as error:
            if not self.fallback:
                raise
            # The step writes only this position's slots: running it again is safe. An error of the
            # step itself (an intervention's) raises here, and is not taken for a failed compile.
            cache.attend_all = False  # the step as it is: over the written slots
            logits = decode_step(self.model, self.run, tokens, cache)
            why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            COMPILE_FAILED[self.key] = why
            COMPILE_SECONDS.pop(self.key, None)
            warnings.warn(f"the compiled decode step failed ({why[:300]}); this generation runs the static step, "
                          "and decode='auto' will not compile this shape again", FastPathNotice, stacklevel=2)
            self.compiled = False
            return logits
        if new:
            COMPILE_SECONDS[self.key] = seconds = time.perf_counter() - start
            b, cap = cache.key_valid.shape
            warnings.warn(f"compiled the decode step (batch {b}, capacity {cap}, {len(self.active)} hooked points) "
                          f"in {seconds:.1f} s; later generations of this shape reuse it", FastPathNotice, stacklevel=2)
        return logits
