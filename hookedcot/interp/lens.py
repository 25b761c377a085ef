"""Logit lens: what the model would predict if it stopped at each layer.

    lens = run_logit_lens(model, "Q: 12*7?\\nA:", targets=[" 84", " 74"], positions="last 3")
    lens.prob            # Result [target, layer, position]: P(target) at each layer and position
    lens.top_tokens[L][i]  # the top-k decoded tokens at row L, position i (lens.top_probs: theirs)
    lens.save("out/lens"); lens.plot("out/lens")

Rows for `sources="resid"`: the residual entering each block (`"{L}_pre"`; row 0 is the
embedding) and the residual after the last block (`"final_post"`). Each row goes through the final
RMSNorm and the unembedding exactly as the model's own output does, so the `"final_post"` row *is*
the model's logits (bit for bit). With `tuned=` (a `hookedcot.dictionaries.TunedLens`), each
`"{L}_pre"` row first goes through translator L (`lens="tuned"` on the result and in plot titles);
a lens with zero translators gives the logit lens exactly. `"attn_out"` / `"mlp_out"` rows unembed each block's attention
or MLP output alone, put through the final norm **on its own scale** (its own RMS, not the full
residual's) — a view of what the component writes, not an additive decomposition (for that use
`cache.decompose_resid` with `cache.apply_ln_to_stack`).

Targets are token ids or strings; a string must be one token (`model.to_single_token`), and a
string that is several tokens is scored by its *first* token (with a warning). Tokenizers differ
on numbers: LLaMA-3 makes " 84" one token, while digit-wise tokenizers (Qwen2, SmolLM2) split it
into " ", "8", "4" — there, target the first digit "8" and read the position after the space.

Memory stays bounded: only the chosen positions' activations are kept ([n_layers, n_pos, d_model]),
and logits are formed one row at a time ([n_pos, d_vocab]); nothing of size layers × vocab × pos
is ever held.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from hookedcot.hook_names import get_act_name
from hookedcot.tokenizer import TokenizerError
from hookedcot.interp.labels import token_labels
from hookedcot.interp.positions import PositionSpec, resolve_positions
from hookedcot.interp.renamed import renamed_constants
from hookedcot.interp.results import Result

Target = Union[int, str]
# What a lens row can read. Not sweeps.PATCH_COMPONENTS (hooks a patch writes): "resid" here means the
# residual entering each block plus the final one, read through the final norm.
LENS_SOURCES = ("resid", "attn_out", "mlp_out")


@dataclass
class LogitLens:
    """The logit lens of one sequence. `prob` / `logit` / `rank` are Results [target, layer,
    position] (None without targets; rank 0 = the top prediction); `top_tokens[layer][pos]` lists the
    top-k decoded tokens and `top_probs[layer][pos]` their probabilities; `top_ids` [layer, pos, k]."""

    prob: Result | None
    logit: Result | None
    rank: Result | None
    top_ids: Tensor
    top_tokens: list[list[list[str]]]
    top_probs: list[list[list[float]]]
    rows: list[str]
    positions: list[int]
    position_labels: list[str]
    targets: list[int] = field(default_factory=list)
    target_labels: list[str] = field(default_factory=list)
    lens: str = "logit"  # "logit" or "tuned"

    def for_target(self, target: int | str = 0) -> dict[str, Result]:
        """{"prob", "logit", "rank"} as 2-d Results [layer, position] for one target (its index or label)."""
        if self.prob is None:
            raise ValueError("this lens was computed without targets")
        t = self.target_labels.index(target) if isinstance(target, str) else target
        out = {}
        for kind in ("prob", "logit", "rank"):
            r: Result = getattr(self, kind)
            out[kind] = Result(r.values[t], ("layer", "position"), {"layer": self.rows, "position": self.position_labels},
                               name=f"{kind}_{_safe(self.target_labels[t])}", meta={**r.meta, "target": self.target_labels[t]})
        return out

    def save(self, directory: str | Path) -> Path:
        """prob/logit/rank JSONs (Result format) and top_k.json with the decoded top tokens."""
        directory = Path(directory)
        for kind in ("prob", "logit", "rank"):
            r = getattr(self, kind)
            if r is not None:
                r.save(directory, f"lens_{kind}.json")
        directory.mkdir(parents=True, exist_ok=True)
        top = {"rows": self.rows, "positions": self.positions, "position_labels": self.position_labels,
               "targets": self.targets, "target_labels": self.target_labels, "top_ids": self.top_ids.tolist(),
               "top_tokens": self.top_tokens, "top_probs": self.top_probs}
        (directory / "lens_top_k.json").write_text(json.dumps(top, indent=1))
        return directory

    def plot(self, directory: str | Path) -> list[Path]:
        """Heatmaps (layer × position, token labels) of P(target) and the target's logit, per target."""
        paths = []
        for t in range(len(self.targets)):
            parts = self.for_target(t)
            label = repr(self.target_labels[t])
            paths.append(parts["prob"].plot(Path(directory) / f"{parts['prob'].name}.png", title=f"{self.lens} lens: P({label})",
                                            cmap="viridis", center=None, value_label="probability"))
            paths.append(parts["logit"].plot(Path(directory) / f"{parts['logit'].name}.png", title=f"{self.lens} lens: logit of {label}",
                                             value_label="logit"))
        return paths


@torch.no_grad()
def run_logit_lens(
    model: Any,
    input: str | Tensor,
    targets: Target | Sequence[Target] | None = None,
    positions: PositionSpec = None,
    sources: str | Sequence[str] = "resid",
    top_k: int = 5,
    attention_mask: Tensor | None = None,
    tuned: Any = None,
) -> LogitLens:
    """The logit lens of one sequence (a string, or token ids [pos] / [1, pos]).

    `positions` (any form positions.py documents; default: every non-padding position) limits
    what is kept. `sources`: "resid", "attn_out", "mlp_out" or a list (`LENS_SOURCES`); rows are
    in firing order ("0_pre", "0_attn_out", "0_mlp_out", "1_pre", ..., "final_post"). `tuned`: a
    TunedLens whose translator L is applied to row "{L}_pre" (resid rows only) before unembedding."""
    tokens, attention_mask = _one_sequence(model, input, attention_mask)
    n_pos = tokens.shape[1]
    pos = resolve_positions(positions, n_pos)
    if positions is None and attention_mask is not None:
        pos = [p for p in pos if bool(attention_mask[0, p])]
    chosen = [sources] if isinstance(sources, str) else list(sources)
    if bad := [c for c in chosen if c not in LENS_SOURCES]:
        raise ValueError(f"unknown lens sources {bad}; choose from {list(LENS_SOURCES)}")
    target_ids, target_labels = _targets(model, targets)
    if tuned is not None and chosen != ["resid"]:
        raise ValueError(f"a tuned lens translates the residual only; use sources='resid' with tuned=, got {chosen}")


    names: list[tuple[str, str]] = []  # (row label, hook name) in firing order
    row_layers: list[int] = []
    for layer in range(model.cfg.n_layers):
        for source in chosen:
            hook_short = "resid_pre" if source == "resid" else source
            label = f"{layer}_pre" if source == "resid" else f"{layer}_{source}"
            names.append((label, get_act_name(hook_short, layer)))
            row_layers.append(layer)
    kept: dict[str, Tensor] = {}
    index = torch.tensor(pos, device=tokens.device)

    def keep(x: Tensor, hook: Any) -> None:
        kept[hook.name] = x[:, index].clone()  # [1, n_pos, d]: only the chosen positions

    logits = model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=[(n, keep) for _, n in names])
    rows = [label for label, _ in names]
    kept_rows: list[Tensor] = [kept[n] for _, n in names]
    if "resid" in chosen:
        rows.append("final_post")

    n_rows, k = len(rows), min(top_k, model.cfg.d_vocab)
    stats = torch.zeros(3, len(target_ids), n_rows, len(pos))  # prob, logit, rank
    top_ids = torch.zeros(n_rows, len(pos), k, dtype=torch.long)
    top_p = torch.zeros(n_rows, len(pos), k)
    tid = torch.tensor(target_ids, dtype=torch.long, device=logits.device)
    for r in range(n_rows):
        # The final row is the model's own output: its logits, not a recomputation.
        if r == len(kept_rows):
            row_logits = logits[0, index]
        elif tuned is not None:
            row_logits = tuned.logits(model, kept_rows[r], row_layers[r])[0]
        else:
            row_logits = model.unembed_resid(kept_rows[r])[0]
        logp = torch.log_softmax(row_logits.float(), dim=-1)  # [n_pos, vocab]
        values, ids = logp.topk(k, dim=-1)
        top_ids[r], top_p[r] = ids.cpu(), values.exp().cpu()
        if len(target_ids):
            picked = row_logits.float()[:, tid].T  # [target, n_pos]
            stats[0, :, r] = logp[:, tid].T.exp().cpu()
            stats[1, :, r] = picked.cpu()
            stats[2, :, r] = (row_logits.float()[None] > picked[:, :, None]).sum(-1).float().cpu()
        del row_logits, logp

    pos_labels = token_labels(model, tokens, pos)
    top_tokens = [[_token_strings(model, top_ids[r, i].tolist()) for i in range(len(pos))] for r in range(n_rows)]
    labels = {"target": target_labels, "layer": rows, "position": pos_labels}
    meta = {"positions": pos, "targets": target_ids, "sources": chosen}
    if tuned is not None:
        meta["lens"] = "tuned"
    results: dict[str, Result | None] = {}
    for i, kind in enumerate(("prob", "logit", "rank")):
        results[kind] = Result(stats[i], ("target", "layer", "position"), labels, name=f"lens_{kind}", meta=meta) if target_ids else None
    return LogitLens(results["prob"], results["logit"], results["rank"], top_ids, top_tokens, top_p.tolist(), rows,
                     pos, pos_labels, target_ids, target_labels, lens="logit" if tuned is None else "tuned")


def _one_sequence(model: Any, input: str | Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if isinstance(input, str):
        tokens, attention_mask = model.tokenize(input)
    elif isinstance(input, Tensor) and not input.is_floating_point():
        tokens = (input[None] if input.dim() == 1 else input).to(model.device)
    else:
        raise TypeError(f"run_logit_lens takes one string or token ids [pos] / [1, pos], got {type(input).__name__}")
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(
            f"run_logit_lens takes one sequence, got token ids of shape {tuple(tokens.shape)}; for a batch call it "
            "per row: run_logit_lens(model, tokens[i], attention_mask=mask[i:i+1])"
        )
    if attention_mask is not None:
        attention_mask = (attention_mask[None] if attention_mask.dim() == 1 else attention_mask).to(tokens.device)
    return tokens, attention_mask


def _targets(model: Any, targets: Target | Sequence[Target] | None) -> tuple[list[int], list[str]]:
    if targets is None:
        return [], []
    items = [targets] if isinstance(targets, (int, str)) else list(targets)
    ids, labels = [], []
    for t in items:
        if isinstance(t, str):
            try:
                tid = model.to_single_token(t)
            except TokenizerError:  # several tokens (or none)
                ids_t = model.to_tokens(t, prepend_bos=False)[0].tolist()
                if not ids_t:
                    raise ValueError(f"target {t!r} tokenizes to nothing") from None
                tid = ids_t[0]
                warnings.warn(f"target {t!r} is {len(ids_t)} tokens; the lens scores its first token "
                              f"{_token_strings(model, [tid])[0]!r} (id {tid})", stacklevel=3)
            ids.append(int(tid)); labels.append(t)
        else:
            if not 0 <= int(t) < model.cfg.d_vocab:
                raise ValueError(f"target id {t} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
            ids.append(int(t)); labels.append(_token_strings(model, [int(t)])[0])
    return ids, labels


def _token_strings(model: Any, ids: list[int]) -> list[str]:
    """The tokens' text (predictions and targets, not position labels); the ids without a tokenizer."""
    try:
        return list(model.to_str_tokens(ids))
    except ValueError:  # no tokenizer
        return [str(i) for i in ids]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.strip()) or "tok"


def logit_lens(*args: Any, components: str | Sequence[str] | None = None, **kwargs: Any) -> LogitLens:
    """Deprecated: use `run_logit_lens` (where `components=` is called `sources=`)."""
    warnings.warn("logit_lens is deprecated and will be removed in the next release; use "
                  "hookedcot.interp.lens.run_logit_lens (components= is now sources=)", DeprecationWarning, stacklevel=2)
    if components is not None:
        kwargs["sources"] = components
    return run_logit_lens(*args, **kwargs)


__getattr__ = renamed_constants(__name__, {"COMPONENTS": ("LENS_SOURCES", LENS_SOURCES)})
