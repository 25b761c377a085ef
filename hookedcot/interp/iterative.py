"""Parallel vs iterative patching of a span of reasoning positions (seed 004).

Parallel: every position of the span patched with the clean activation in one forward.
Iterative: patch the first position, run forward, look at what the model itself now produces at
the next position (its activation, and its cosine similarity to the clean one), patch that
position, and so on. If the inputs are fixed the two end in the same run — the patched values are
the same — so they differ only when the patch changes the *inputs* of later positions: a
re-decoded token CoT (`regenerate="greedy"`) or a continuous-thought model that feeds a
position's hidden state back as the next input embedding (`regenerate=fn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from hookedcot.hook_names import get_act_name
from hookedcot.interp.patching import Metric, _resolve_positions, as_tokens


@dataclass
class IterativeResult:
    metric: float  # the metric on the final, fully patched run
    produced_cosine: list[float]  # cos(produced activation, clean activation) at each later span position
    final_logits: Tensor  # [1, n_metric, vocab]


def _writer(clean: Tensor, positions: list[int]):
    def hook(x: Tensor, h) -> Tensor:
        x = x.clone()
        x[:, positions] = clean[:, positions]
        return x

    return hook


@torch.no_grad()
def parallel_patch(model: Any, clean: str | Tensor, corrupted: str | Tensor | None, layer: int, span: Any,
                   metric: Metric, hook: str = "resid_post", metric_positions: Sequence[int] = (-1,),
                   corrupted_embeds: Tensor | None = None) -> float:
    """Patch every span position at `layer` at once; the metric of that run."""
    name = get_act_name(hook, layer)
    clean_t = as_tokens(model, clean)
    _, cache = model.run_with_cache(clean_t, names_filter=name)
    span_pos = _resolve_positions(clean_t.shape[1], span)
    inputs = {"inputs_embeds": corrupted_embeds} if corrupted_embeds is not None else {"input": as_tokens(model, corrupted)}
    logits = model.run_with_hooks(**inputs, fwd_hooks=[(name, _writer(cache[name], span_pos))])
    return float(metric(logits[:, list(metric_positions)])[0])


@torch.no_grad()
def iterative_patch(
    model: Any, clean: str | Tensor, corrupted: str | Tensor | None, layer: int, span: Any, metric: Metric,
    hook: str = "resid_post", metric_positions: Sequence[int] = (-1,),
    regenerate: None | str | Callable[[Tensor], Tensor] = None, corrupted_embeds: Tensor | None = None,
) -> IterativeResult:
    """Patch the span one position at a time, letting the model produce the next position from
    the run patched so far. `regenerate`: None (inputs fixed), "greedy" (the token after each
    patched position becomes the patched run's argmax), or fn(hidden [d_model]) -> next input
    embedding [d_model] (continuous thought; pass `corrupted_embeds` [1, p, d] then)."""
    name = get_act_name(hook, layer)
    clean_t = as_tokens(model, clean)
    _, cache = model.run_with_cache(clean_t, names_filter=name)
    ref = cache[name]
    span_pos = _resolve_positions(clean_t.shape[1], span)
    if callable(regenerate) and corrupted_embeds is None:
        raise ValueError("a regenerate function produces input embeddings: pass corrupted_embeds [1, pos, d_model]")
    tokens = None if corrupted_embeds is not None else as_tokens(model, corrupted).clone()
    embeds = None if corrupted_embeds is None else corrupted_embeds.clone()
    cosines: list[float] = []
    final_names = [name, get_act_name("resid_post", model.cfg.n_layers - 1)]
    for i, pos in enumerate(span_pos):
        fwd = [(name, _writer(ref, span_pos[: i + 1]))]
        inputs = {"inputs_embeds": embeds} if embeds is not None else {"input": tokens}
        logits, run_cache = model.run_with_cache(**inputs, fwd_hooks=fwd, names_filter=final_names)
        if i + 1 == len(span_pos):
            break
        nxt = span_pos[i + 1]
        if regenerate == "greedy" and tokens is not None:
            tokens[0, nxt] = logits[0, nxt - 1].argmax()
        elif callable(regenerate):
            embeds[0, nxt] = regenerate(run_cache[final_names[1]][0, nxt - 1]).to(embeds.dtype)
        elif regenerate is not None:
            raise ValueError(f"regenerate must be None, 'greedy' or a function, got {regenerate!r}")
        if regenerate is not None:  # the next position's own activation, from its new input
            inputs = {"inputs_embeds": embeds} if embeds is not None else {"input": tokens}
            _, run_cache = model.run_with_cache(**inputs, fwd_hooks=fwd, names_filter=name)
        produced = run_cache[name][0, nxt].float()
        cosines.append(float(torch.nn.functional.cosine_similarity(produced, ref[0, nxt].float(), dim=0)))
    final = logits[:, list(metric_positions)]
    return IterativeResult(float(metric(final)[0]), cosines, final)
