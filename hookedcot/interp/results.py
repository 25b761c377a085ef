"""Labelled results: a tensor whose axes have names and tick labels, saved as JSON and drawn as a heatmap.

Every sweep, lens and trace returns one, so researchers get `.to_pandas()`, `.save(dir)` and
`.plot(path)` the same way everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass
class Result:
    """`values` with one name per axis (e.g. ("layer", "position")) and optional tick labels."""

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    name: str = "result"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = self.values.detach().float().cpu()
        if self.values.dim() != len(self.axes):
            raise ValueError(f"{self.name}: {self.values.dim()}-d values but {len(self.axes)} axis names {self.axes}")
        for axis, ticks in self.labels.items():
            size = self.values.shape[self.axes.index(axis)]
            if len(ticks) != size:
                raise ValueError(f"{self.name}: axis {axis!r} has {size} entries but {len(ticks)} labels")

    def ticks(self, axis: str) -> list[str]:
        size = self.values.shape[self.axes.index(axis)]
        return self.labels.get(axis, [str(i) for i in range(size)])

    def to_pandas(self):
        """A long-format DataFrame: one column per axis (index and label) plus `value`."""
        import pandas as pd

        idx = torch.cartesian_prod(*[torch.arange(n) for n in self.values.shape]) if self.values.dim() > 1 else torch.arange(self.values.numel())[:, None]
        rows: dict[str, list[Any]] = {}
        for i, axis in enumerate(self.axes):
            col = idx[:, i].tolist()
            rows[axis] = col
            if axis in self.labels:
                rows[f"{axis}_label"] = [self.labels[axis][j] for j in col]
        rows["value"] = self.values.reshape(-1).tolist()
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "axes": list(self.axes),
            "shape": list(self.values.shape),
            "labels": self.labels,
            "values": self.values.tolist(),
            "meta": _jsonable(self.meta),
        }

    def save(self, directory: str | Path, filename: str | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / (filename or f"{self.name}.json")
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Result":
        data = json.loads(Path(path).read_text())
        return cls(torch.tensor(data["values"]), tuple(data["axes"]), data["labels"], data["name"], data["meta"])

    def plot(
        self,
        path: str | Path,
        title: str | None = None,
        cmap: str = "RdBu_r",
        center: float | None = 0.0,
        value_label: str | None = None,
        max_ticks: int = 80,
        caption: str | None = None,
    ) -> Path:
        """A heatmap PNG of a 2-d result (1-d: a line plot), token labels on the x axis;
        `caption` is a line under the figure saying what it shows."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        v = self.values
        if v.dim() == 1:
            fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(v)), 3.5))
            ax.plot(range(len(v)), v.tolist(), marker="o")
            ax.set_xticks(range(len(v)), _short(self.ticks(self.axes[0])), rotation=90, fontsize=7)
            ax.set_xlabel(self.axes[0])
            ax.set_ylabel(value_label or self.name)
            ax.grid(alpha=0.3)
        elif v.dim() == 2:
            rows, cols = v.shape
            fig, ax = plt.subplots(figsize=(min(24, max(6, 0.28 * cols + 2)), min(16, max(3.5, 0.3 * rows + 1.5))))
            kwargs: dict[str, Any] = {"cmap": cmap, "aspect": "auto", "interpolation": "nearest"}
            if center is not None and v.numel():
                bound = float((v - center).abs().max()) or 1.0
                kwargs.update(vmin=center - bound, vmax=center + bound)
            image = ax.imshow(v.numpy(), **kwargs)
            fig.colorbar(image, ax=ax, label=value_label or self.name)
            ax.set_ylabel(self.axes[0])
            ax.set_xlabel(self.axes[1])
            step_r, step_c = max(1, rows // max_ticks + 1), max(1, cols // max_ticks + 1)
            ax.set_yticks(range(0, rows, step_r), _short(self.ticks(self.axes[0])[::step_r]), fontsize=7)
            ax.set_xticks(range(0, cols, step_c), _short(self.ticks(self.axes[1])[::step_c]), rotation=90, fontsize=7)
        else:
            raise ValueError(f"plot() draws 1-d or 2-d results; {self.name} has axes {self.axes} — index it first")
        ax.set_title(title or self.name)
        if caption:
            fig.text(0.01, 0.005, caption, fontsize=8, ha="left", va="bottom", wrap=True)
            fig.tight_layout(rect=(0, 0.06, 1, 1))
        else:
            fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _short(labels: Sequence[str], width: int = 16) -> list[str]:
    """Readable tick labels: whitespace made visible, long tokens cut."""
    out = []
    for s in labels:
        s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        s = s if s.strip() else repr(s)
        out.append(s if len(s) <= width else s[: width - 1] + "…")
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)
