"""Attention suppression: which earlier steps each later step's predictions lean on.

Thought Anchors' causal step × step matrix (Bogdan et al. 2025): suppress step i — remove its
keys from the attention of every position after it, in every head (or in chosen layers / heads) —
and compare, at each position of each later step j, the next-token distribution with the
unsuppressed run's: M[i, j] = mean over the positions of step j of KL(p_unsuppressed ‖ p_suppressed).
NaN where j <= i, where step j is empty, and in rows not suppressed; an empty step i suppresses
nothing (its row is exactly 0).

Cost: one forward per suppressed step, over the positions after it only. Positions before the
end of step i are left as the unsuppressed run computed them: those before it cannot see it, and
those inside it feed later positions only through their keys, which are suppressed. So the trace
runs once with a KV cache, then steps are taken last first: truncate the cache at the end of step
i and run the rest. Each such run overwrites only cache positions after step i, which every step
taken later (an earlier one) runs again anyway.

    sup = suppress_steps(model, cot)                    # every step, every head
    sup = suppress_steps(model, cot, heads=[(12, 3), (14, 0)])   # chosen (layer, head) pairs
    sup.plot("suppression.png")
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hookedcot.cot.attention import Span, check_layers, figure, nan_to_none, none_to_nan, save_figure, step_input
from hookedcot.kv_cache import KVCache

FORMAT = "hookedcot.cot.suppression/1"
KEEP_REFERENCE_ELEMENTS = 1 << 26  # keep the unsuppressed log-probs when pos × vocab is at most this (256 MiB)
HeadSites = dict[int, list[int]]  # layer -> heads


def head_sites(model: Any, layers: Any = None, heads: Any = None) -> HeadSites | None:
    """Where to suppress: None for every head of every layer, else {layer: [heads]}. `heads` is a
    list of head indices (in `layers`, default all) or of (layer, head) pairs."""
    if layers is None and heads is None:
        return None
    n_heads = model.cfg.n_heads
    pairs = heads is not None and len(heads) > 0 and all(isinstance(h, (tuple, list)) for h in heads)
    if pairs:
        if layers is not None:
            raise ValueError("heads= as (layer, head) pairs names the layers already; drop layers=")
        sites: HeadSites = {}
        for pair in heads:
            if len(pair) != 2:
                raise ValueError(f"{pair!r} is not a (layer, head) pair")
            layer = check_layers(model, [pair[0]])[0]
            sites.setdefault(layer, []).append(_check_head(pair[1], n_heads))
    else:
        chosen = list(range(n_heads)) if heads is None else [_check_head(h, n_heads) for h in heads]
        if not chosen:
            raise ValueError("heads= is empty; pass None for every head")
        sites = {layer: chosen for layer in check_layers(model, layers)}
    return {layer: sorted(set(hs)) for layer, hs in sorted(sites.items())}


def _check_head(head: Any, n_heads: int) -> int:
    return _index(head, n_heads, f"head {head!r} does not exist: this model has {n_heads} heads per layer")


def _index(value: Any, n: int, problem: str) -> int:
    """`value` as an int in 0..n-1 (not a bool), else ValueError: `problem` and the valid range."""
    try:
        index = operator.index(value)
    except TypeError:
        index = -1
    if isinstance(value, bool) or not 0 <= index < n:
        raise ValueError(f"{problem} (0..{n - 1})")
    return index


def suppression(span: Span, sites: HeadSites | None, first: int, length: int, device: Any) -> tuple[dict, list]:
    """(forward keyword arguments, hooks) for a forward of positions [first, length) in which the
    keys of `span` are hidden from every position after the span.

    Every head: the model's own attention mask, zero at the span (position ids passed explicitly,
    since the model would otherwise count them from the mask). Chosen heads: a hook on those
    layers' `hook_attn_scores` sets the chosen heads' scores at the span's keys to -inf (this
    makes those layers materialise their scores: [heads, positions run, length] floats)."""
    start, end = span
    if sites is None:
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        mask[:, start:end] = 0
        return {"attention_mask": mask, "position_ids": torch.arange(first, length, device=device)[None]}, []

    def hide(scores: Tensor, hook: Any) -> Tensor:
        row = max(0, end - hook.past_len)  # the first query after the span
        heads = torch.tensor(sites[hook.layer()], device=scores.device)
        scores[:, heads, row:, start:end] = float("-inf")
        return scores

    return {}, [(f"blocks.{layer}.attn.hook_attn_scores", hide) for layer in sites]


def check_steps(steps: Any, n_steps: int) -> list[int]:
    if steps is None:
        return list(range(n_steps))
    out = []
    for step in [steps] if isinstance(steps, int) else list(steps):
        out.append(_index(step, n_steps, f"step {step!r} does not exist: the trace has {n_steps} steps"))
    return sorted(set(out))


def _log_probs(model: Any, resid: Tensor) -> Tensor:
    return model.unembed_resid(resid).float().log_softmax(-1)


class _Reference:
    """The unsuppressed run's next-token log-probs, from its final residual: kept whole when
    pos × vocab is small, else unembedded again chunk by chunk (4,096 × 49,152 floats is 768 MiB)."""

    def __init__(self, model: Any, resid: Tensor):
        self.model, self.resid = model, resid
        small = resid.shape[0] * model.cfg.d_vocab <= KEEP_REFERENCE_ELEMENTS
        self.kept = _log_probs(model, resid) if small else None

    def log_probs(self, a: int, b: int) -> Tensor:
        return self.kept[a:b] if self.kept is not None else _log_probs(self.model, self.resid[a:b])


def suppress_steps(
    model: Any,
    cot: Any = None,
    *,
    tokens: Any = None,
    spans: Sequence[Span] | None = None,
    steps: int | Sequence[int] | None = None,
    layers: int | Sequence[int] | None = None,
    heads: Sequence[Any] | None = None,
    chunk: int = 256,
) -> "SuppressionResult":
    """The step × step suppression matrix (module docstring), for the suppressed `steps` (list
    indices into the CoT's steps; None: all). `layers` / `heads` restrict the suppression to
    those heads (see `head_sites`); default every head of every layer. `chunk` positions are
    unembedded at a time."""
    inp = step_input(model, cot, tokens=tokens, spans=spans)
    sites = head_sites(model, layers, heads)
    chosen = check_steps(steps, len(inp.spans))
    n_layers, length, spans_ = model.cfg.n_layers, inp.length, inp.spans
    matrix = torch.full((len(spans_), len(spans_)), math.nan)
    cache = KVCache(model.cfg, 1, length, model.dtype, model.device)
    with torch.inference_mode():
        reference = _Reference(model, model(**inp.forward_args(), past_kv=cache, stop_at_layer=n_layers)[0])
        for i in sorted(chosen, key=lambda i: spans_[i][1], reverse=True):  # last first: see the module docstring
            start, end = spans_[i]
            later = [j for j in range(i + 1, len(spans_)) if spans_[j][1] > spans_[j][0]]
            if not later:
                continue
            if start == end:  # no keys to hide: the run is the unsuppressed one
                matrix[i, later] = 0.0
                continue
            cache.truncate(end)
            kwargs, hooks = suppression((start, end), sites, end, length, model.device)
            with model.hooks(hooks):
                resid = model(**inp.forward_args(end), past_kv=cache, stop_at_layer=n_layers, **kwargs)[0]
            a, b = spans_[later[0]][0], spans_[later[-1]][1]
            kl = torch.cat([
                _kl(reference.log_probs(c0, min(c0 + chunk, b)), _log_probs(model, resid[c0 - end:min(c0 + chunk, b) - end]))
                for c0 in range(a, b, chunk)
            ])
            for j in later:
                matrix[i, j] = kl[spans_[j][0] - a:spans_[j][1] - a].mean()
    return SuppressionResult(matrix, chosen, spans_, inp.texts, None if sites is None else sites)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def suppressed_logits(
    model: Any, cot: Any = None, *, step: int, tokens: Any = None, spans: Sequence[Span] | None = None,
    layers: Any = None, heads: Any = None,
) -> Float[Tensor, "pos d_vocab"]:
    """The whole trace's logits with `step` suppressed, from one full forward (no cache): to look
    at every position, or to check `suppress_steps` against."""
    inp = step_input(model, cot, tokens=tokens, spans=spans)
    sites = head_sites(model, layers, heads)
    (i,) = check_steps([step], len(inp.spans))
    kwargs, hooks = suppression(inp.spans[i], sites, 0, inp.length, model.device)
    with torch.inference_mode(), model.hooks(hooks):
        return model(**inp.forward_args(), **kwargs)[0]


@dataclass
class SuppressionResult:
    """`matrix` [S, S] float32: row i = the suppressed step, column j = the later step measured
    (mean KL in nats). `sites` None: every head was suppressed; else {layer: [heads]}."""

    matrix: Tensor
    steps: list[int]
    spans: list[Span]
    texts: list[str] | None = None
    sites: HeadSites | None = None

    def plot(self, path: str | Path, log: bool = False, max_chars: int = 32) -> Path:
        """The matrix as a heatmap (`log`: log10 of the KL), step texts as tick labels."""
        values = self.matrix.clone()
        if log:
            values = values.clamp(min=1e-12).log10()
        n = values.shape[0]
        size = min(18.0, max(6.0, 0.22 * n + 3))
        fig, ax = figure((size + 1.5, size))
        image = ax.imshow(values.numpy(), cmap="magma", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=("log10 " if log else "") + "mean KL (nats) at step j")
        ax.set_xlabel("step j (measured)")
        ax.set_ylabel("step i (suppressed)")
        if self.texts is not None and n <= 60:
            labels = [f"{k}: {t[:max_chars]}" for k, t in enumerate(self.texts)]
            ax.set_yticks(range(n), labels, fontsize=6)
        where = "every head" if self.sites is None else f"{sum(map(len, self.sites.values()))} heads"
        ax.set_title(f"attention suppression ({where})")
        return save_figure(fig, path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (NaN as null)."""
        sites = None if self.sites is None else [[layer, h] for layer, hs in self.sites.items() for h in hs]
        return {"format": FORMAT, "steps": list(self.steps), "spans": [list(s) for s in self.spans],
                "texts": self.texts, "sites": sites, "matrix": nan_to_none(self.matrix.tolist())}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SuppressionResult":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a suppression result (format {data.get('format')!r}, expected {FORMAT!r})")
        sites = None
        if data.get("sites") is not None:
            sites = {}
            for layer, head in data["sites"]:
                sites.setdefault(int(layer), []).append(int(head))
        matrix = torch.tensor(none_to_nan(data["matrix"]), dtype=torch.float32)
        return cls(matrix, list(data["steps"]), [tuple(s) for s in data["spans"]], data.get("texts"), sites)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path
