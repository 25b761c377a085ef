"""Parallel vs iterative patching of a span of reasoning positions.

Parallel: every position of the span patched with the clean activation in one forward.
Iterative: patch the first position, run forward, look at what the model itself now produces at
the next position (its activation, and its cosine similarity to the clean one), patch that
position, and so on. If the inputs are fixed the two end in the same run — the patched values are
the same — so they differ only when the patch changes the *inputs* of later positions: a
re-decoded token CoT (`regenerate="greedy"`) or a continuous-thought model that feeds a
position's hidden state back as the next input embedding (`regenerate=fn`).

Both go through the patching engine. Each iterative step changes the run only from its patched
position on (the inputs it regenerates lie later still), so it keeps the previous step's keys and
values before that position and recomputes only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from hookedcot.hook_names import get_act_name
from hookedcot.interp.patching import (
    Metrics, PatchRuns, Site, forward_patched, logits_at, metrics_by_name, per_metric, prepare_runs, run_sites,
    shaped_like,
)
from hookedcot.interp.positions import position_axis, resolve_positions
from hookedcot.interp.renamed import renamed


@dataclass
class IterativeResult:
    metric: float | dict[str, float]  # the metric(s) on the final, fully patched run
    produced_cosine: list[float]  # cos(produced activation, clean activation) at each later span position
    final_logits: Tensor  # [1, n_metric, vocab]



@torch.no_grad()
def patch_in_parallel(model: Any, clean: str | Tensor, corrupted: str | Tensor | None, layer: int, span: Any,
                      metric: Metrics, hook: str = "resid_post", metric_positions: Any = (-1,),
                      corrupted_embeds: Tensor | None = None, runs: PatchRuns | None = None) -> float | dict[str, float]:
    """Patch every span position at `layer` at once; the metric of that run (a dict of them for
    several metrics by name). `runs` (from `prepare_runs`) saves the clean and corrupted runs when
    calling again for another layer or span."""
    name = get_act_name(hook, layer)
    runs = _runs(model, clean, corrupted, name, corrupted_embeds, runs)
    site = Site(name, tuple(_span(span, runs.n_pos)))
    return per_metric(run_sites(runs, [site], metric, metric_positions, progress=False), lambda v: float(v[0]))


@torch.no_grad()
def patch_iteratively(
    model: Any, clean: str | Tensor, corrupted: str | Tensor | None, layer: int, span: Any, metric: Metrics,
    hook: str = "resid_post", metric_positions: Any = (-1,),
    regenerate: None | str | Callable[[Tensor], Tensor] = None, corrupted_embeds: Tensor | None = None,
    runs: PatchRuns | None = None,
) -> IterativeResult:
    """Patch the span one position at a time (in increasing order), letting the model produce the
    next position from the run patched so far. `regenerate`: None (inputs fixed), "greedy" (the
    token after each patched position becomes the patched run's argmax), or fn(hidden [d_model])
    -> next input embedding [d_model] (continuous thought: the residual after the last block feeds
    the next position; pass `corrupted_embeds` [1, p, d] then). `runs` as for `patch_in_parallel`."""
    if not (regenerate is None or regenerate == "greedy" or callable(regenerate)):
        raise ValueError(f"regenerate must be None, 'greedy' or a function, got {regenerate!r}")
    if callable(regenerate) and corrupted_embeds is None and (runs is None or runs.corrupted_embeds is None):
        raise ValueError("a regenerate function produces input embeddings: pass corrupted_embeds [1, pos, d_model]")
    name = get_act_name(hook, layer)
    runs = _runs(model, clean, corrupted, name, corrupted_embeds, runs)
    if regenerate == "greedy" and runs.corrupted_embeds is not None:
        raise ValueError("regenerate='greedy' re-decodes tokens; with corrupted_embeds pass a function hidden -> embedding")
    span_pos = sorted(set(_span(span, runs.n_pos)))
    metric_pos = runs.metric_positions(metric_positions)
    metrics = metrics_by_name(metric)
    ref = runs.clean_acts[name].movedim(position_axis(name), 1)  # [1, p, ...]
    inputs = None
    if regenerate is not None:
        inputs = runs.corrupted_embeds.clone() if runs.corrupted_embeds is not None else runs.corrupted_tokens.clone()
    kv = runs.corrupted_kv.select_rows(torch.zeros(1, dtype=torch.long, device=model.device))
    cosines: list[float] = []
    for i, pos in enumerate(span_pos):
        last = i + 1 == len(span_pos)
        # The last step of fixed inputs recomputes from the span's start, as the parallel patch
        # does, so the identity "iterative = parallel" holds bit for bit.
        p0 = min(span_pos[0] if inputs is None else pos, metric_pos[0]) if last else pos
        seen: dict[str, Tensor] = {}

        def observe(x: Tensor, h, pos: int = pos) -> None:  # what the model produces at `pos`, before the patch
            seen["x"] = x.movedim(position_axis(name), 1)[0, pos - int(h.positions[0])].clone()

        final = forward_patched(runs, [Site(name, tuple(span_pos[: i + 1]))], p_min=p0, kv=kv,
                                inputs=None if inputs is None else inputs[:, p0:], observers=[(name, observe)])
        if i > 0:
            cosines.append(float(torch.nn.functional.cosine_similarity(
                seen["x"].flatten().float(), ref[0, pos].flatten().float(), dim=0)))
        if last:
            break
        nxt = span_pos[i + 1]
        if regenerate == "greedy":
            inputs[0, nxt] = logits_at(model, final, [nxt - 1 - p0])[0, 0].argmax()
        elif callable(regenerate):
            inputs[0, nxt] = regenerate(final[0, nxt - 1 - p0]).to(inputs.dtype)
    final_logits = logits_at(model, final, [p - p0 for p in metric_pos])
    values = {k: float(fn(final_logits)[0]) for k, fn in metrics.items()}
    return IterativeResult(shaped_like(metric, values), cosines, final_logits)


def _span(span: Any, n_pos: int) -> list[int]:
    positions = resolve_positions(span, n_pos)
    if not positions:
        raise ValueError(f"span {span!r} selects no position of the {n_pos}-token prompt")
    return positions


def _runs(model: Any, clean: Any, corrupted: Any, name: str, corrupted_embeds: Tensor | None,
          runs: PatchRuns | None) -> PatchRuns:
    if runs is None:
        return prepare_runs(model, clean, corrupted, [name], corrupted_embeds=corrupted_embeds)
    if runs.model is not model:
        raise ValueError("runs were prepared with another model")
    given = [("clean", clean, runs.clean_tokens), ("corrupted", corrupted, runs.corrupted_tokens)]
    if corrupted_embeds is not None or any(x is not None and not _same_tokens(model, x, ref) for _, x, ref in given):
        raise ValueError("runs= already holds the clean and corrupted runs: pass clean=None, corrupted=None (or the "
                         "same inputs) and no corrupted_embeds, or leave out runs= to prepare these inputs")
    return runs.ensure([name])


def _same_tokens(model: Any, x: Any, ref: Tensor | None) -> bool:
    if ref is None:
        return False
    tokens = model.to_tokens(x) if isinstance(x, str) else x
    return isinstance(tokens, Tensor) and tokens.reshape(1, -1).shape == ref.shape and torch.equal(tokens.reshape(1, -1).to(ref.device), ref)


parallel_patch = renamed(patch_in_parallel, "parallel_patch")
iterative_patch = renamed(patch_iteratively, "iterative_patch")
