"""Accuracy over a problem set, once per intervention: does steering, zeroing or patching features
change what the model gets right?

Each question goes through the chat template (or is used as it is), the rows are generated greedily
in left-padded batches (a padded row equals the row run alone), the answer is read from the
completion with `hookedcot.cot.answers` (a box, "the answer is", else the last number — not for a
completion cut off at `max_new_tokens`, whose last number is mid-reasoning) and compared after
normalisation. Accuracy comes with a Wilson 95 % interval, which stays inside [0, 1] and is
honest at the small n these runs have.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tqdm.auto import tqdm

from hookedcot.cot.answers import answers_match, extract_answer
from hookedcot.dictionaries.feature_patch import generate_with


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    return low, 1.0 if correct == n else min(1.0, centre + half)


@dataclass
class Accuracy:
    name: str
    n: int
    correct: int
    low: float
    high: float
    answers: list[str | None] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "ci95": [self.low, self.high], "answers": self.answers, "completions": self.completions}


def load_problems(path: str | Path) -> list[tuple[str, str]]:
    """A JSON list of {"question": ..., "answer": ...} -> [(question, answer)]."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(isinstance(d, dict) and {"question", "answer"} <= set(d) for d in data):
        raise ValueError(f"{path}: expected a JSON list of objects with 'question' and 'answer'")
    return [(str(d["question"]), str(d["answer"])) for d in data]


def evaluate_accuracy(
    model: Any,
    problems: Sequence[Any],
    interventions: Mapping[str, Iterable] | None = None,
    *,
    chat: bool = True,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Accuracy]:
    """One `Accuracy` per intervention (name -> hooks, as `fwd_hooks=` takes them, and/or live
    interventions such as `FeaturePatch`; default: a baseline without hooks). `problems`: (question, answer) pairs, `interp.data.Problem`s, or dicts
    with "question" and "answer"."""
    pairs = [_pair(p) for p in problems]
    prompts = [model.apply_chat_template([{"role": "user", "content": q}]) if chat else q for q, _ in pairs]
    out = []
    for name, spec in (interventions or {"baseline": ()}).items():
        spec = spec if spec is None or hasattr(spec, "fwd_hooks") else list(spec)  # a generator serves every batch
        completions: list[str] = []
        finished: list[bool] = []
        for lo in tqdm(range(0, len(prompts), batch_size), desc=f"accuracy: {name}", disable=not progress, leave=False):
            batch = prompts[lo : lo + batch_size]
            tokens, mask = model.tokenize(batch)
            generated = generate_with(model, tokens, max_new_tokens, spec, attention_mask=mask, return_type="tokens")
            tok = model.tokenizer
            stops = set(getattr(tok, "eos_token_ids", []) or [])
            for row in generated[:, tokens.shape[1]:].tolist():
                kept = _until_stop(row, stops)
                completions.append(tok.decode(kept))
                finished.append(len(kept) < len(row) or len(row) < max_new_tokens)
        # a completion cut off at max_new_tokens is mid-reasoning: only an explicit answer counts
        answers = [extract_answer(c, last_number=done) for c, done in zip(completions, finished)]
        correct = sum(answers_match(a, ref) for a, (_, ref) in zip(answers, pairs))
        out.append(Accuracy(name, len(pairs), correct, *wilson_interval(correct, len(pairs)), answers, completions))
    return out


def accuracy_table(results: Sequence[Accuracy]) -> str:
    """Markdown, one row per intervention."""
    lines = ["| intervention | correct / n | accuracy | 95 % CI (Wilson) |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.correct} / {r.n} | {r.accuracy:.3f} | {r.low:.3f}–{r.high:.3f} |" for r in results]
    return "\n".join(lines)


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def _pair(problem: Any) -> tuple[str, str]:
    if isinstance(problem, (tuple, list)) and len(problem) == 2:
        return str(problem[0]), str(problem[1])
    if isinstance(problem, Mapping):
        return str(problem["question"]), str(problem["answer"])
    if hasattr(problem, "question") and hasattr(problem, "answer"):
        return str(problem.question), str(problem.answer)
    raise TypeError(f"a problem is (question, answer), a dict with both, or a Problem; got {type(problem).__name__}")
