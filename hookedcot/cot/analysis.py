"""One call: every measure of step importance on one trace, as a table, figures and a page.

`analyze_cot(model, question_or_cot)` generates the trace (or takes one), then runs what
`measures` names: resampling and counterfactual importance (rollouts), forced answering,
attention anatomy (step × step attention, vertical scores, receiver heads) and attention
suppression. The result has one row per step (`to_pandas`), `save(dir)` / `CoTAnalysis.load(dir)`,
`plot(dir)` (PNG figures) and `html(path)` (one self-contained page to read the trace by).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from hookedcot.cot.attention import StepAttention, nan_to_none, save_figure, step_attention
from hookedcot.cot.forced import ForcedAnswers, force_answers
from hookedcot.cot.importance import ResamplingResult, resample_steps
from hookedcot.cot.page import write_html
from hookedcot.cot.steps import StepRule
from hookedcot.cot.suppression import SuppressionResult, suppress_steps
from hookedcot.cot.trace import THINK, CoT

MEASURES = ("resampling", "counterfactual", "forced", "attention", "suppression")
LABELS = {  # short: the page's measure switch shows them; the README and docstrings say the rest
    "resampling": "resampling (KL, answers without ‖ with the step)",
    "counterfactual": "counterfactual (the same, differing resamples only)",
    "forced": "forced (Δ log p of the answer)",
    "vertical": "vertical score (receiver heads)",
}


@dataclass
class CoTAnalysis:
    cot: CoT
    resampling: ResamplingResult | None = None
    forced: ForcedAnswers | None = None
    attention: StepAttention | None = None
    suppression: SuppressionResult | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ the table
    def measure(self, name: str) -> list[float | None]:
        """One value per step for `resampling`, `counterfactual`, `forced` or `vertical`."""
        n = self.cot.n_steps
        if name in ("resampling", "counterfactual") and self.resampling is not None:
            values = self.resampling.importance if name == "resampling" else self.resampling.counterfactual
        elif name == "forced" and self.forced is not None:
            values = self.forced.importance
        elif name == "vertical" and self.attention is not None:
            values = self.receiver_vertical_scores()
        else:
            return [None] * n
        return [_finite(v) for v in list(values)[:n]]

    def receiver_heads(self) -> list[tuple[int, int, float]]:
        if self.attention is None:
            return []
        return self.attention.receiver_heads(top_k=self.settings.get("top_k_heads", 16), k=self.settings.get("proximity", 4))

    def receiver_vertical_scores(self) -> list[float]:
        """Per step, the vertical score averaged over the receiver heads (NaNs left out)."""
        k = self.settings.get("proximity", 4)
        scores = self.attention.vertical_scores(k)
        heads = self.receiver_heads()
        if not heads:
            return [math.nan] * self.cot.n_steps
        rows = torch.stack([scores[self.attention.layers.index(l), h] for l, h, _ in heads])
        return [float(x) for x in torch.nanmean(rows.double(), dim=0)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per step: index, text, token span, and every measure (None where not run)."""
        columns = {name: self.measure(name) for name in ("resampling", "counterfactual", "forced", "vertical")}
        rows = []
        for step in self.cot.steps:
            row = {"step": step.index, "text": step.text, "token_start": step.tokens[0], "token_end": step.tokens[1]}
            row.update({name: columns[name][step.index] for name in columns})
            if self.resampling is not None:
                row["accuracy_without"] = _finite(self.resampling.acc_without[step.index])
                row["accuracy_with"] = _finite(self.resampling.acc_with[step.index])
                row["n_kept"] = self.resampling.n_kept[step.index]
            if self.forced is not None:
                row["forced_answer_after"] = self.forced.forced_answer[step.index + 1]
            rows.append(row)
        return rows

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows()).set_index("step")

    # ------------------------------------------------------------------ outputs
    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings, "seconds": self.seconds, "rows": self.rows(),
            "resampling": None if self.resampling is None else self.resampling.to_dict(),
            "forced": None if self.forced is None else self.forced.to_dict(),
            "attention": None if self.attention is None else self.attention.to_dict(),
            "suppression": None if self.suppression is None else self.suppression.to_dict(),
            "receiver_heads": [{"layer": l, "head": h, "kurtosis": _finite(k)} for l, h, k in self.receiver_heads()],
        }

    def save(self, out_dir: str | Path) -> Path:
        """`cot.json` (the trace) and `analysis.json` (every measure, raw), in `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.cot.save(out / "cot.json")
        (out / "analysis.json").write_text(json.dumps(nan_to_none(self.to_dict()), indent=1, ensure_ascii=False))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> "CoTAnalysis":
        out = Path(out_dir)
        data = json.loads((out / "analysis.json").read_text())
        return cls(
            cot=CoT.load(out / "cot.json"),
            resampling=None if data["resampling"] is None else _resampling_from_dict(data["resampling"]),
            forced=None if data["forced"] is None else _forced_from_dict(data["forced"]),
            attention=None if data["attention"] is None else StepAttention.from_dict(data["attention"]),
            suppression=None if data["suppression"] is None else SuppressionResult.from_dict(data["suppression"]),
            settings=data["settings"], seconds=data["seconds"],
        )

    def plot(self, out_dir: str | Path) -> list[Path]:
        """PNG figures: the measures per step, the step × step attention of the receiver heads,
        the vertical scores, the suppression matrix."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [_plot_measures(self, out / "importance_by_step.png")]
        if self.attention is not None and self.receiver_heads():  # none when no step has one k steps later
            top_k, k = self.settings.get("top_k_heads", 16), self.settings.get("proximity", 4)
            paths.append(self.attention.plot_heatmap(out / "step_attention.png", top_k=top_k, k=k))
            paths.append(self.attention.plot_vertical(out / "vertical_scores.png", self.cot.step_texts, top_k=top_k, k=k))
        if self.suppression is not None:
            paths.append(self.suppression.plot(out / "suppression.png"))
        return paths

    def write(self, out_dir: str | Path) -> list[Path]:
        """Everything in one folder: `cot.json`, `analysis.json`, `steps.csv`, the figures and `cot.html`."""
        out = self.save(out_dir)
        _write_csv(self.rows(), out / "steps.csv")
        return [out / "cot.json", out / "analysis.json", out / "steps.csv", *self.plot(out), self.html(out / "cot.html")]

    def summary(self) -> str:
        """The per-step table as markdown (values to 3 significant digits)."""
        names = [n for n in ("resampling", "counterfactual", "forced", "vertical")
                 if any(v is not None for v in self.measure(n))]
        head = f"{self.cot!r}\n\n| step | tokens | " + " | ".join(names) + " | text |\n|" + "---|" * (len(names) + 3)
        lines = [head]
        for row in self.rows():
            values = " | ".join("–" if row[n] is None else f"{row[n]:.3g}" for n in names)
            text = row["text"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row['step']} | {row['token_start']}–{row['token_end']} | {values} | {text[:70]} |")
        return "\n".join(lines)

    def page_data(self) -> dict[str, Any]:
        measures = {name: self.measure(name) for name in ("resampling", "counterfactual", "forced", "vertical")}
        measures = {k: v for k, v in measures.items() if any(x is not None for x in v)}
        attention = None
        if self.attention is not None and self.receiver_heads():
            top_k, k = self.settings.get("top_k_heads", 16), self.settings.get("proximity", 4)
            attention = nan_to_none(self.attention.receiver_matrix(top_k=top_k, k=k).tolist())
        return {
            "title": f"Chain of thought: {self.cot.meta.get('question', self.cot.prompt)[:80]}",
            "prompt": self.cot.meta.get("question", self.cot.prompt), "answer": self.cot.answer,
            "correct_answer": self.cot.correct_answer, "model": self.settings.get("model"),
            "steps": [{"index": s.index, "text": s.text, "tokens": list(s.tokens)} for s in self.cot.steps],
            "measures": measures, "measure_labels": {k: LABELS[k] for k in measures},
            "attention": attention,
            "suppression": None if self.suppression is None else nan_to_none(self.suppression.matrix.tolist()),
            "receiver_heads": [{"layer": l, "head": h, "kurtosis": _finite(k)} for l, h, k in self.receiver_heads()],
        }

    def html(self, path: str | Path) -> Path:
        """One self-contained HTML file: the reasoning shaded by importance; click a step for its links."""
        return write_html(self.page_data(), path)


def analyze_cot(
    model: Any,
    question_or_cot: str | CoT,
    *,
    measures: Sequence[str] = MEASURES,
    correct_answer: str | None = None,
    chat: bool = True,
    think: tuple[str, str] | None = THINK,
    steps: StepRule = "sentences",
    max_trace_tokens: int = 1024,
    n_rollouts: int = 16,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    seed: int = 0,
    similarity: Callable[[str, str], float] | None = None,
    threshold: float = 0.8,
    forcing: str | None = None,
    proximity: int = 4,
    top_k_heads: int = 16,
    rollout_dir: str | Path | None = None,
    progress: bool = True,
) -> CoTAnalysis:
    """Analyse one trace. A question is answered first (greedy, through the chat template when
    `chat`), a `CoT` is taken as it is. Rollouts use `temperature`, `top_p`, `max_new_tokens` and
    `seed` (see `resample_steps`); with `rollout_dir` they are written there as they finish and a
    rerun resumes. `proximity` is the vertical score's k, `top_k_heads` the number of receiver
    heads. Each measure's wall time is in `result.seconds`."""
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown:
        raise ValueError(f"unknown measure(s) {unknown}; choose from {', '.join(MEASURES)}")
    correct_answer = None if correct_answer is None else str(correct_answer)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(question_or_cot, CoT):
        cot = copy.copy(question_or_cot)  # the caller's trace keeps its own correct_answer
        if correct_answer is not None:
            cot.correct_answer = correct_answer
        token_only = sorted(set(measures) & {"resampling", "counterfactual", "forced"})
        if cot.embeds is not None and token_only:
            raise ValueError(f"{', '.join(token_only)} need a token trace; this CoT has latent positions: "
                             "pass measures=('attention', 'suppression')")
    else:
        cot = CoT.generate(model, question_or_cot, chat=chat, think=think, steps=steps,
                           max_new_tokens=max_trace_tokens, correct_answer=correct_answer)
        seconds["trace"] = time.perf_counter() - t0
    settings = {"model": model.cfg.model_name,
                "measures": list(measures), "n_rollouts": n_rollouts, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "threshold": threshold, "proximity": proximity,
                "top_k_heads": top_k_heads, "forcing": forcing}
    result = CoTAnalysis(cot, settings=settings, seconds=seconds)
    if cot.n_steps == 0:
        warnings.warn(f"the trace has no reasoning steps (reasoning {cot.reasoning!r}); nothing was measured", stacklevel=2)
        return result
    if "resampling" in measures or "counterfactual" in measures:
        t = time.perf_counter()
        result.resampling = resample_steps(
            model, cot, n_rollouts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
            similarity=similarity, threshold=threshold, out_dir=rollout_dir, progress=progress)
        seconds["resampling"] = time.perf_counter() - t
    if "forced" in measures:
        t = time.perf_counter()
        result.forced = force_answers(model, cot, forcing=forcing)
        seconds["forced"] = time.perf_counter() - t
    if "attention" in measures:
        t = time.perf_counter()
        result.attention = step_attention(model, cot)
        seconds["attention"] = time.perf_counter() - t
    if "suppression" in measures:
        t = time.perf_counter()
        result.suppression = suppress_steps(model, cot)
        seconds["suppression"] = time.perf_counter() - t
    return result


def _forced_from_dict(data: dict[str, Any]) -> ForcedAnswers:
    kept = {k: v for k, v in data.items() if k != "importance"}
    kept["logprob"] = [math.nan if v is None else v for v in kept["logprob"]]  # JSON wrote NaN as null
    return ForcedAnswers(**kept)


def _resampling_from_dict(data: dict[str, Any]) -> ResamplingResult:
    """The numbers back (the rollouts themselves stay in their JSONL file)."""
    names = {f.name for f in fields(ResamplingResult)} - {"rollouts"}
    kept = {k: v for k, v in data.items() if k in names}
    kept["rollouts_path"] = None if kept.get("rollouts_path") is None else Path(kept["rollouts_path"])
    for key in ("importance", "counterfactual", "acc_counterfactual", "accuracy"):
        kept[key] = [math.nan if v is None else v for v in kept[key]]
    return ResamplingResult(**kept)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["step"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _plot_measures(result: CoTAnalysis, path: Path) -> Path:
    """One bar chart per measure that was run, steps on the x axis (labelled with their start)."""
    from matplotlib.figure import Figure

    names = [n for n in ("resampling", "counterfactual", "forced", "vertical")
             if any(v is not None for v in result.measure(n))]
    n_steps = result.cot.n_steps
    fig = Figure(figsize=(max(6, 0.35 * n_steps + 2), 2.2 * max(len(names), 1) + 0.6))
    axes = fig.subplots(max(len(names), 1), 1, squeeze=False)  # no pyplot: a notebook's backend stays as it is
    for ax, name in zip(axes[:, 0], names):
        values = [math.nan if v is None else v for v in result.measure(name)]
        ax.bar(range(n_steps), values, color="tab:orange" if name != "vertical" else "tab:blue")
        ax.set_title(LABELS[name], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    labels = [f"{s.index}: {s.text[:18]}" for s in result.cot.steps]
    axes[-1, 0].set_xticks(range(n_steps), labels, rotation=60, ha="right", fontsize=7)
    if not names:
        axes[0, 0].set_title("no per-step measure was run")
    return save_figure(fig, path)


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
