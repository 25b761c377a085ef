"""Attention anatomy: how much each reasoning step attends to each earlier one, per layer and head.

Thought Anchors (Bogdan et al. 2025) average each head's attention pattern over blocks of tokens
(query tokens of step i × key tokens of step j) into a step × step matrix. A step's *vertical
score* is the mean attention it receives from steps at least k later; *receiver heads* are the
heads whose vertical scores are most heavy-tailed (highest kurtosis): heads that single out a few
steps which everything later keeps reading.

A trace runs to thousands of tokens, and every layer's pattern at once (SmolLM2 at 4,096 tokens:
30 × 9 × 4096² floats, 18 GiB) does not fit. So one forward runs on the fused attention path, and
hooks on each layer's rotated queries and keys recompute that layer's softmax a chunk of queries
at a time, reducing each chunk to step blocks at once: the extra memory is one chunk's scores.

    att = step_attention(model, cot)                   # or tokens=ids, spans=[(start, end), ...]
    att.receiver_heads(top_k=16)                       # [(layer, head, kurtosis), ...]
    att.plot_heatmap("anatomy.png")                    # the receiver heads' mean step × step matrix
    att.plot_vertical("vertical.png")                  # per-step vertical scores, step texts as labels
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

Span = tuple[int, int]
FORMAT = "hookedcot.cot.step_attention/1"
CHUNK_ELEMENTS = 1 << 24  # default query chunk: about this many scores (64 MiB in float32) at once
MAX_STEPS_PER_CHUNK = 64  # the row reduction is a matmul over the chunk's steps: keep it below q·kᵀ's cost


# ---------------------------------------------------------------- the trace as the model runs it
@dataclass
class StepInput:
    """One trace as the model runs it: token ids or embeddings, and each step's token span."""

    tokens: Tensor | None  # [1, pos] long, on the model's device
    embeds: Tensor | None  # [1, pos, d_model]: latent positions have no token id
    spans: list[Span]  # half-open [start, end) positions per step, in order, disjoint, maybe empty
    texts: list[str] | None

    @property
    def length(self) -> int:
        return (self.embeds if self.embeds is not None else self.tokens).shape[1]

    def forward_args(self, start: int = 0) -> dict[str, Tensor]:
        """The keyword arguments that run positions [start, pos) of the trace."""
        if self.embeds is not None:
            return {"inputs_embeds": self.embeds[:, start:]}
        return {"input": self.tokens[:, start:]}


def step_input(model: Any, cot: Any = None, *, tokens: Any = None, spans: Sequence[Span] | None = None) -> StepInput:
    """A CoT-like object (`.tokens`, `.steps[i].tokens`, `.steps[i].text`, optional `.embeds`) or
    raw `tokens` ([pos], [1, pos] or a list) with `spans`, checked and put on the model's device."""
    if cot is not None and tokens is not None:
        raise ValueError("pass either a CoT (cot=) or tokens= with spans=, not both")
    embeds, texts = None, None
    if cot is not None:
        if spans is not None:
            raise ValueError("a CoT's steps give the spans; pass spans= only with tokens= (or use cot.resplit)")
        tokens, spans = cot.tokens, [tuple(step.tokens) for step in cot.steps]
        texts = [str(step.text) for step in cot.steps]
        embeds = getattr(cot, "embeds", None)
    elif tokens is None:
        raise ValueError("nothing to analyse: pass a CoT (cot=) or tokens= with spans=[(start, end), ...]")
    elif spans is None:
        raise ValueError("tokens= needs spans=: one half-open (start, end) token span per step")
    if embeds is not None:
        d = model.cfg.d_model
        if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[2] != d:
            raise ValueError(f"cot.embeds must be [1, pos, {d}] (one trace), got {tuple(embeds.shape)}")
        embeds, ids = embeds.to(model.device, model.dtype), None
        length = embeds.shape[1]
    else:
        ids = torch.as_tensor(tokens.tolist() if isinstance(tokens, Tensor) else list(tokens), dtype=torch.long)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"tokens must be one trace, [pos] or [1, pos]; got shape {tuple(ids.shape)}")
        ids, length = ids[None].to(model.device), ids.shape[0]
    return StepInput(ids, embeds, check_spans(spans, length), texts)


def check_spans(spans: Sequence[Any], length: int) -> list[Span]:
    """Spans as int pairs, each inside the trace, in order and disjoint (empty ones allowed)."""
    out: list[Span] = []
    for n, span in enumerate(spans):
        try:
            start, end = (operator.index(x) for x in span)
        except (TypeError, ValueError):
            raise ValueError(f"step {n}'s span is {span!r}; each span is a pair (start, end) of token positions") from None
        if not 0 <= start <= end <= length:
            raise ValueError(
                f"step {n}'s span ({start}, {end}) does not fit the trace's {length} positions: spans are half-open "
                f"token positions with 0 <= start <= end <= {length} (fix spans=, or rebuild the CoT's steps)"
            )
        if out and start < out[-1][1]:
            raise ValueError(
                f"steps {n - 1} and {n} overlap or are out of order: {out[-1]} then ({start}, {end}); steps must be "
                "disjoint and sorted by position (sort the spans, or merge the overlapping ones)"
            )
        out.append((start, end))
    if not out:
        raise ValueError("the trace has no steps: give at least one (start, end) span")
    return out


def check_layers(model: Any, layers: int | Sequence[int] | None) -> list[int]:
    """Layer indices (negative counts from the end) -> sorted distinct layers; None: all."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    out = set()
    for layer in [layers] if isinstance(layers, int) else list(layers):
        try:
            index = operator.index(layer)
        except TypeError:
            index = None
        if index is None or isinstance(layer, bool) or not -n <= index < n:
            raise ValueError(f"layer {layer!r} does not exist: this model has {n} layers; pass layers= as indices "
                             f"0..{n - 1} (negative ones count from the end)")
        out.add(index % n)
    if not out:
        raise ValueError("layers= is empty; pass None for every layer")
    return sorted(out)


# ---------------------------------------------------------------- the chunked pattern, reduced to blocks
def block_sums(
    q: Float[Tensor, "pos heads d_head"], key: Float[Tensor, "pos kv_heads d_head"], spans: list[Span],
    chunk: int, scaling: float,
) -> Float[Tensor, "heads steps steps"]:
    """Sum of one layer's causal softmax pattern over every (query step, key step) block, float64.

    Scores as the model's explicit path computes them (q·kᵀ times d_head^-½, causal -inf, softmax
    in float32), `chunk` queries at a time against the keys up to the chunk's last query. A chunk
    is summed over each step's query rows by a matmul with the rows' 0/1 step membership (at most
    MAX_STEPS_PER_CHUNK steps, so it costs at most what q·kᵀ costs), then over each step's keys by
    a cumulative sum along the keys read at the step boundaries: O(pos²) per head in all."""
    n_pos, n_heads, d_head = q.shape
    n_kv = key.shape[1]
    rep = n_heads // n_kv
    out = torch.zeros(n_heads, len(spans), len(spans), dtype=torch.float64, device=q.device)
    nonempty = [s for s, e in spans if e > s]
    if not nonempty:
        return out
    lo = nonempty[0]  # keys before the first step belong to no block
    keys_t = key.permute(1, 0, 2).contiguous().transpose(1, 2)  # g k pos
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu_(1)
    step_of = torch.full((n_pos,), -1, dtype=torch.long, device=q.device)
    for j, (s, e) in enumerate(spans):
        step_of[s:e] = j
    starts = torch.tensor([s for s, _ in spans], device=q.device)
    ends = torch.tensor([e for _, e in spans], device=q.device)
    for c0, c1, steps in query_chunks(spans, chunk):
        c = c1 - c0
        # a kv head's query heads side by side: [g, rep * c, k] @ [g, k, c1], GQA without copying keys;
        # baddbmm's alpha scales the product, the model's order (q·kᵀ, then the scale)
        qc = q[c0:c1].permute(1, 0, 2).reshape(n_kv, rep * c, d_head)
        scores = torch.baddbmm(qc.new_zeros(1, 1, 1), qc, keys_t[:, :, :c1], beta=0.0, alpha=scaling)
        scores = scores.view(n_heads, c, c1)
        scores[:, :, c0:].masked_fill_(causal[:c, :c], float("-inf"))
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32)
        del scores
        rows = torch.tensor(steps, device=q.device)
        member = (step_of[None, c0:c1] == rows[:, None]).to(pattern.dtype)  # n c
        by_row = torch.matmul(member, pattern)[:, :, lo:].double()  # h n keys
        cum = F.pad(by_row.cumsum(-1), (1, 0))
        m = int((starts < c1).sum())  # steps with a key in this chunk (spans are sorted)
        block = cum.index_select(-1, ends[:m].clamp(lo, c1) - lo) - cum.index_select(-1, starts[:m].clamp(min=lo) - lo)
        out[:, :, :m].index_add_(1, rows, block)
    return out


def query_chunks(spans: list[Span], chunk: int) -> Iterator[tuple[int, int, list[int]]]:
    """(first query, end, the steps whose rows lie there) per chunk: at most `chunk` queries and
    MAX_STEPS_PER_CHUNK steps, only positions inside a step (the prompt and the answer are skipped)."""
    steps = [(i, s, e) for i, (s, e) in enumerate(spans) if e > s]
    k, c0 = 0, 0
    while k < len(steps):
        c0 = max(c0, steps[k][1])
        c1 = c0 + chunk
        here: list[int] = []
        while k < len(steps) and steps[k][1] < c1 and len(here) < MAX_STEPS_PER_CHUNK:
            i, s, e = steps[k]
            here.append(i)
            if e > c1:  # the step goes on in the next chunk
                break
            k += 1
        c1 = min(c1, spans[here[-1]][1])
        yield c0, c1, here
        c0 = c1


def default_chunk(n_heads: int, length: int) -> int:
    """Queries per chunk so one chunk's scores hold about CHUNK_ELEMENTS floats."""
    return max(16, min(length, CHUNK_ELEMENTS // max(1, n_heads * length)))


def step_attention(
    model: Any,
    cot: Any = None,
    *,
    tokens: Any = None,
    spans: Sequence[Span] | None = None,
    layers: int | Sequence[int] | None = None,
    query_chunk: int | None = None,
) -> "StepAttention":
    """Step × step attention of every head in `layers` (None: all), from one forward.

    A[l, h, i, j] is the mean of head (l, h)'s attention pattern over the query tokens of step i
    and the key tokens of step j (NaN where either step is empty). `query_chunk` queries are
    scored at a time (default: about 16 M scores); the forward stops after the last layer asked
    for and unembeds nothing."""
    inp = step_input(model, cot, tokens=tokens, spans=spans)
    chosen = check_layers(model, layers)
    chunk = default_chunk(model.cfg.n_heads, inp.length) if query_chunk is None else int(query_chunk)
    if chunk < 1:
        raise ValueError(f"query_chunk must be a positive number of queries, got {query_chunk}")
    scaling = model.cfg.d_head**-0.5
    pending: dict[int, Tensor] = {}
    sums: dict[int, Tensor] = {}

    def keep_q(q: Tensor, hook: Any) -> None:
        pending[hook.layer()] = q

    def reduce_layer(key: Tensor, hook: Any) -> None:
        layer = hook.layer()
        sums[layer] = block_sums(pending.pop(layer)[0], key[0], inp.spans, chunk, scaling)

    hooks = [(f"blocks.{layer}.attn.hook_rot_q", keep_q) for layer in chosen]
    hooks += [(f"blocks.{layer}.attn.hook_rot_k", reduce_layer) for layer in chosen]
    with torch.inference_mode():
        model.run_with_hooks(**inp.forward_args(), fwd_hooks=hooks, stop_at_layer=chosen[-1] + 1)
    sizes = torch.tensor([float(e - s) for s, e in inp.spans], dtype=torch.float64, device=model.device)
    counts = sizes[:, None] * sizes[None, :]
    matrix = torch.stack([sums[layer] for layer in chosen]) / counts.where(counts > 0, torch.nan)
    return StepAttention(matrix.float().cpu(), chosen, inp.spans, inp.texts)


# ---------------------------------------------------------------- the result
def excess_kurtosis(x: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Fisher's excess kurtosis m4 / m2² - 3 along the last axis, NaNs omitted: what
    `scipy.stats.kurtosis(x, fisher=True, bias=True, nan_policy="omit")` gives. NaN where no
    value is left or all values are equal (scipy's rule: m2 at rounding level of the mean)."""
    x = x.double()
    valid = ~torch.isnan(x)
    n = valid.sum(-1)
    mean = torch.where(valid, x, 0.0).sum(-1) / n
    d = torch.where(valid, x - mean[..., None], 0.0)
    m2, m4 = d.pow(2).sum(-1) / n, d.pow(4).sum(-1) / n
    flat = m2 <= (torch.finfo(torch.float64).resolution * mean.abs()) ** 2
    return torch.where((n > 0) & ~flat, m4 / m2.pow(2) - 3.0, torch.nan)


@dataclass
class StepAttention:
    """Step × step attention per layer and head: `matrix` [len(layers), n_heads, S, S] float32,
    rows are the attending (query) step, columns the attended (key) step."""

    matrix: Tensor
    layers: list[int]
    spans: list[Span]
    texts: list[str] | None = None

    @property
    def n_steps(self) -> int:
        return self.matrix.shape[-1]

    def head(self, layer: int, head: int) -> Float[Tensor, "steps steps"]:
        """One head's S × S matrix (`layer` is the model's layer index)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not analysed; this result holds layers {self.layers}")
        if not 0 <= head < self.matrix.shape[1]:
            raise ValueError(f"head {head} does not exist: the model has {self.matrix.shape[1]} heads")
        return self.matrix[self.layers.index(layer), head]

    def vertical_scores(self, k: int = 4) -> Float[Tensor, "layers heads steps"]:
        """For each step j, the mean of A[i, j] over the steps i >= j + k (empty steps left out):
        the attention j receives from steps at least k later. NaN when no such step exists."""
        idx = torch.arange(self.n_steps)
        later = idx[:, None] >= idx[None, :] + k  # [i, j]
        return torch.nanmean(self.matrix.double().masked_fill(~later, torch.nan), dim=-2).float()

    def kurtosis(self, k: int = 4) -> Float[Tensor, "layers heads"]:
        """Each head's excess kurtosis of its vertical scores: high = a few steps stand out."""
        return excess_kurtosis(self.vertical_scores(k)).float()

    def receiver_heads(self, top_k: int = 16, k: int = 4) -> list[tuple[int, int, float]]:
        """The `top_k` heads (at most all of them) of highest kurtosis, as (layer, head, kurtosis),
        highest first; heads whose kurtosis is undefined (NaN) are never chosen."""
        kurt = self.kurtosis(k)
        ranked = sorted(
            ((self.layers[li], h, float(kurt[li, h])) for li in range(kurt.shape[0]) for h in range(kurt.shape[1])
             if not math.isnan(kurt[li, h])),
            key=lambda t: -t[2],
        )
        return ranked[: max(0, min(top_k, kurt.numel()))]

    def receiver_matrix(self, top_k: int = 16, k: int = 4) -> Float[Tensor, "steps steps"]:
        """The mean S × S matrix over the receiver heads."""
        heads = self.receiver_heads(top_k, k)
        if not heads:
            raise ValueError("no head has a defined kurtosis (too few steps at distance >= k?): lower k, or "
                             "plot one head with layer= and head=")
        return torch.stack([self.head(layer, head) for layer, head, _ in heads]).mean(0)

    def _pick(self, layer: int | None, head: int | None, top_k: int, k: int) -> tuple[Tensor, str]:
        if layer is None and head is None:
            return self.receiver_matrix(top_k, k), f"mean of the top {top_k} receiver heads (k = {k})"
        if layer is None or head is None:
            raise ValueError("pass both layer= and head= for one head, or neither for the receiver heads' mean")
        return self.head(layer, head), f"layer {layer}, head {head}"

    def plot_heatmap(self, path: str | Path, layer: int | None = None, head: int | None = None, *,
                     top_k: int = 16, k: int = 4) -> Path:
        """The step × step heatmap of one head, or (default) the mean over the receiver heads."""
        matrix, title = self._pick(layer, head, top_k, k)
        fig, ax = figure((7.5, 6.5))
        image = ax.imshow(matrix.numpy(), cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="mean attention (query step → key step)")
        ax.set_xlabel("key step (attended to)")
        ax.set_ylabel("query step (attending)")
        ax.set_title(title)
        return save_figure(fig, path)

    def plot_vertical(self, path: str | Path, step_texts: Sequence[str] | None = None, layer: int | None = None,
                      head: int | None = None, *, top_k: int = 16, k: int = 4, max_chars: int = 48) -> Path:
        """Each step's vertical score (one head, or the mean over the receiver heads) as bars
        labelled with the step texts (default: the CoT's)."""
        if layer is None and head is None:
            heads = self.receiver_heads(top_k, k)
            scores = self.vertical_scores(k)
            values = torch.stack([scores[self.layers.index(la), h] for la, h, _ in heads]).nanmean(0) if heads else None
            title = f"vertical scores, mean of the top {top_k} receiver heads (k = {k})"
            if values is None:
                self.receiver_matrix(top_k, k)  # raises the explanation
        else:
            self._pick(layer, head, top_k, k)
            values = self.vertical_scores(k)[self.layers.index(layer), head]
            title = f"vertical scores, layer {layer} head {head} (k = {k})"
        texts = list(step_texts) if step_texts is not None else self.texts or [f"step {i}" for i in range(self.n_steps)]
        if len(texts) != self.n_steps:
            raise ValueError(f"{len(texts)} step texts for {self.n_steps} steps; pass one text per step")
        labels = [f"{i}: {t[:max_chars]}{'…' if len(t) > max_chars else ''}" for i, t in enumerate(texts)]
        fig, ax = figure((8, max(3.0, 0.22 * self.n_steps + 1.2)))
        ax.barh(range(self.n_steps), torch.nan_to_num(values).tolist())
        ax.set_yticks(range(self.n_steps), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("mean attention received from steps ≥ k later")
        ax.set_title(title)
        return save_figure(fig, path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (NaN as null)."""
        return {"format": FORMAT, "layers": list(self.layers), "spans": [list(s) for s in self.spans],
                "texts": self.texts, "matrix": nan_to_none(self.matrix.tolist())}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepAttention":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a step attention result (format {data.get('format')!r}, expected {FORMAT!r})")
        matrix = torch.tensor(none_to_nan(data["matrix"]), dtype=torch.float32)
        return cls(matrix, list(data["layers"]), [tuple(s) for s in data["spans"]], data.get("texts"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path


# ---------------------------------------------------------------- helpers shared with suppression.py
def nan_to_none(x: Any) -> Any:
    """JSON-able: NaN (and ±inf, which JSON has neither) become None, through lists, tuples, dicts."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def none_to_nan(x: Any) -> Any:
    if isinstance(x, list):
        return [none_to_nan(v) for v in x]
    return math.nan if x is None else x


def figure(size: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib Figure drawn with Agg, without pyplot: no global backend is switched and no
    figure lingers in pyplot's registry."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots()


def save_figure(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
