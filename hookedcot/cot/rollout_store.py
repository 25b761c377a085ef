"""Rollouts on disk: one JSON line per finished rollout, so an interrupted run resumes.

The file's first line is a header fingerprinting what the rollouts depend on: the trace's tokens
and its prefix ends (the CoT and how it is cut into steps), the sampling parameters, the base
seed, and the model's name and dtype. Every later line is one finished `Rollout` (its prefix k,
index, seed, new token ids, text, answer, finish). Lines are flushed as written; a run that dies
leaves at most one half-written last line, which a resume drops. Resuming with anything in the
header changed raises an error naming the difference: the rollouts on disk would not be the ones
this call asks for. The number of rollouts is not in the header: asking for more later samples
only the new indices (rollout seeds depend on the index, not on how many are asked for).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from hookedcot.cot.rollouts import Rollout

FORMAT = "hookedcot.rollouts/1"
FILE_NAME = "rollouts.jsonl"


def trace_fingerprint(tokens: list[int], prefix_ends: list[int]) -> str:
    """sha256 (16 hex digits) of a trace's tokens and the token count of each of its prefixes."""
    payload = json.dumps({"tokens": [int(t) for t in tokens], "ends": [int(e) for e in prefix_ends]})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_rollouts(path: str | Path) -> tuple[dict[str, Any], list[Rollout]]:
    """(header, rollouts) of a rollout file; a half-written last line is skipped."""
    lines = list(_complete_lines(Path(path)))
    if not lines:
        raise ValueError(f"{path} holds no rollout header (an empty or foreign file)")
    header = json.loads(lines[0])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a hookedcot rollout file (format {header.get('format')!r}, expected {FORMAT!r})")
    return header, [Rollout.from_dict(json.loads(line)) for line in lines[1:]]


class RolloutStore:
    """An append-only rollout file in `folder`: opened fresh, or resumed when its header matches.

    `done` maps (prefix, index) to the rollouts already on disk; `append` writes and flushes one."""

    def __init__(self, folder: str | Path, header: dict[str, Any]):
        self.path = Path(folder) / FILE_NAME
        self.header = {"format": FORMAT, **header}
        self.done: dict[tuple[int | None, int], Rollout] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            old, rollouts = read_rollouts(self.path)
            _check_same(self.path, old, self.header)
            self.done = {(r.prefix, r.index): r for r in rollouts}
            _drop_partial_line(self.path)
            self._file = self.path.open("a", encoding="utf-8")
        else:
            self._file = self.path.open("w", encoding="utf-8")
            self._write(self.header)

    def append(self, rollout: Rollout) -> None:
        self._write(rollout.to_dict())
        self.done[(rollout.prefix, rollout.index)] = rollout

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RolloutStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_same(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Raise if the file's header differs from this run's, naming each difference."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: file has {a.get(k)!r}, this call {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: file has {a!r}, this call {b!r}")
    if diffs:
        raise ValueError(
            f"{path} was written by a different run ({'; '.join(diffs)}). Its rollouts are not the ones this call "
            "asks for: pass a new out_dir, or the same trace, model and sampling parameters to resume it."
        )


def _complete_lines(path: Path) -> Iterator[str]:
    """Lines ended by a newline: an unterminated last line is a write the run did not finish."""
    lines = path.read_text(encoding="utf-8").split("\n")
    yield from (line for line in lines[:-1] if line.strip())


def _drop_partial_line(path: Path) -> None:
    """Cut a half-written last line so the next append starts on a line of its own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
