"""`run_with_cache` as one compiled graph: every recorded activation is an output of the graph
(an in-graph write), not a Python hook call.

Why: a full cache through hooks costs one Python call, one dict lookup and one tensor kept alive
per hook point; on a GPU, where a forward of these models waits on the host, that overhead is
what made the full cache 1.35–1.67 × the plain forward (README, Performance). Compiled, the records
are the graph's own outputs: nothing runs in Python between the model's ops, and inductor fuses
the small ops around them.

What it covers: token ids without padding, the hook names `names_filter` selects (as
`run_with_cache`), no hooks active on the model (a hook that edits would not run inside the graph,
so one active is refused, naming it). One compile per (model, input shape, names); later calls of
that shape reuse it. `GRAPH_COMPILE_SECONDS` keeps each compile's time.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookedcot.cache import ActivationCache
from hookedcot.fast_decode import FastPathNotice, active_hooks, compile_limits, compiled_once
from hookedcot.inputs import check_length, check_tokens

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT

GRAPH_COMPILE_SECONDS: dict[tuple, float] = {}


class RecordingRun:
    """The run surface the model calls (`listens`, `run(name, x)`) for a traced forward: the chosen
    hook points hand their activation to `store`, which the compiled function returns."""

    def __init__(self, names: frozenset[str]):
        self.names, self.store = names, {}

    def listens(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, x: Tensor) -> Tensor:
        if name in self.names:
            self.store[name] = x
        return x


def _forward(model: "HookedCoT", run: RecordingRun, tokens: Tensor, position_ids: Tensor) -> tuple[Tensor, dict]:
    from hookedcot.model import Transformer

    return Transformer.forward(model, tokens, run, position_ids), run.store


_compiled = compiled_once(_forward)


@torch.no_grad()  # not inference mode: the cached tensors behave as run_with_cache's (usable in autograd later)
def run_with_cache_compiled(model: "HookedCoT", tokens: Tensor, names_filter: Any = None) -> tuple[Tensor, ActivationCache]:
    """(logits, cache) as `model.run_with_cache(tokens, names_filter=...)` gives them, from one
    compiled graph. `tokens`: ids [batch, pos] (or [pos]), no padding. A compile that fails (no C++
    compiler, dynamo's graph limit for this function reached) leaves a notice and runs
    `run_with_cache` instead."""
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.dim() not in (1, 2):
        raise ValueError("run_with_cache_compiled takes token ids [batch, pos] or [pos]; for text, padding or "
                         "embeddings use model.run_with_cache")
    if getattr(model, "placement", None) is not None:
        raise ValueError("run_with_cache_compiled needs the model on one device; this one is split by a device_map")
    active = active_hooks(model)
    if active:
        name, fns = next(iter(active.items()))
        raise ValueError(f"hook {fns[0]!r} on {name!r} is active, and a compiled cache would not run it; remove it "
                         "(model.reset_hooks() or leave its block) or use model.run_with_cache")
    tokens = (tokens[None] if tokens.dim() == 1 else tokens).to(model.device)
    b, p = tokens.shape
    check_length(b, p, 0, model.cfg.n_ctx)  # the checks forward makes: inside a graph a bad id is no clear error
    check_tokens(tokens, model.cfg.d_vocab)
    names = frozenset(model.cache_names(names_filter))
    position_ids = torch.arange(p, device=tokens.device)[None].expand(b, p)
    key = (id(model), str(model.device), str(model.dtype), b, p, tuple(sorted(names)))
    start = time.perf_counter()
    try:
        with compile_limits():
            logits, store = _compiled()(model, RecordingRun(names), tokens, position_ids)
    except Exception as error:  # a forward of valid ids that fails here failed to compile
        why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"the compiled cached forward failed ({why[:300]}); ran run_with_cache instead",
                      FastPathNotice, stacklevel=3)
        return model.run_with_cache(tokens, names_filter=names_filter)
    if key not in GRAPH_COMPILE_SECONDS:
        GRAPH_COMPILE_SECONDS[key] = seconds = time.perf_counter() - start
        warnings.warn(f"compiled a cached forward ({b}×{p} tokens, {len(names)} hook points) in {seconds:.1f} s; "
                      "later calls of this shape reuse it", FastPathNotice, stacklevel=3)
    return logits, ActivationCache(dict(store), model)
