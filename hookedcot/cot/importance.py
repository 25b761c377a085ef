"""Resampling and counterfactual importance of each step of a CoT (Thought Anchors, Bogdan et al. 2025).

For prefix k = 0..n_steps (`cot.prefix(k)`: the prompt and the reasoning before step k) N
rollouts are sampled (`rollouts.run_prefix`). Step i is judged by comparing the answers of the
rollouts that lack it (prefix i, which resample step i and everything after) with those that keep
it (prefix i + 1): adjacent steps share rollouts, so (n_steps + 1) · N rollouts in all.

- resampling importance of step i = KL(p_without || p_with) over the answer distributions, in nats;
- counterfactual importance: the same, with p_without from only the rollouts whose first new step
  differs from step i (similarity < threshold; default `ResidualSimilarity`, threshold 0.8);
- accuracy with and without the step, against `cot.correct_answer` (else the trace's own answer).

Answers are compared after `normalize_answer`; a rollout without an answer counts as the outcome
"<no answer>". Distributions are smoothed additively over the outcomes either side saw:
p(a) = (count(a) / n + ε) / (1 + ε · outcomes), ε = `smoothing` = 0.01 by default: at the paper's
100 rollouts a side this is Laplace's add-one ((count + 1) / (n + outcomes)), and since it smooths
proportions, not counts, identical distributions give 0 whatever the two sample sizes (the
counterfactual side keeps only some rollouts). An outcome one side never produced then costs a
finite amount; ε = 0 gives the raw (possibly infinite) KL.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from tqdm.auto import tqdm

from hookedcot.cot.answers import answers_match, extract_answer, normalize_answer
from hookedcot.cot.rollout_store import RolloutStore, trace_fingerprint
from hookedcot.cot.rollouts import Rollout, Sampling, prefix_key, rollout_seed, run_prefix
from hookedcot.cot.similarity import ResidualSimilarity
from hookedcot.cot.steps import split_steps
from hookedcot.cot.trace import CoT

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT

NO_ANSWER = "<no answer>"
THRESHOLD = 0.8  # Thought Anchors' median-similarity threshold
SMOOTHING = 0.01  # pseudo-probability per outcome (module docstring)
Similarity = Callable[[str, str], float]


def answer_counts(answers: Iterable[str | None]) -> dict[str, int]:
    """Outcome -> count: answers normalised, a missing one counted as NO_ANSWER."""
    return dict(Counter(normalize_answer(a) or NO_ANSWER for a in answers))


def answer_kl(p_counts: Mapping[str, int], q_counts: Mapping[str, int], smoothing: float = SMOOTHING) -> float:
    """KL(p || q) in nats between two answer-count distributions, each smoothed additively over the
    union of their outcomes (see the module docstring). NaN when either side has no rollouts."""
    n_p, n_q = sum(p_counts.values()), sum(q_counts.values())
    if n_p == 0 or n_q == 0:
        return float("nan")
    support = sorted(set(p_counts) | set(q_counts))
    total = 0.0
    for outcome in support:
        p = (p_counts.get(outcome, 0) / n_p + smoothing) / (1 + smoothing * len(support))
        q = (q_counts.get(outcome, 0) / n_q + smoothing) / (1 + smoothing * len(support))
        if p > 0:
            total += p * (math.log(p / q) if q > 0 else math.inf)
    return total


def first_step(text: str, rule: Any = "sentences") -> str:
    """The first step of a rollout's new text ("" when it has none)."""
    steps = split_steps(text, rule)
    return steps[0] if steps else ""


def keep_different(first_steps: Sequence[str], step_text: str, similarity: Similarity, threshold: float) -> list[bool]:
    """Which rollouts count for counterfactual importance: those whose first new step has
    similarity < threshold to the step they replace. A rollout with no new step at all (an
    immediate eos) dropped the step, so it counts; the similarity never sees an empty text."""
    return [not first or similarity(first, step_text) < threshold for first in first_steps]


@dataclass
class ResamplingResult:
    """Per step i (length n_steps) and per prefix k (length n_steps + 1); `to_dict()` for JSON."""

    steps: list[str]
    reference_answer: str | None
    n_rollouts: int
    threshold: float
    smoothing: float
    accuracy: list[float]  # per prefix k
    distributions: list[dict[str, int]]  # per prefix k: normalised answer -> count
    importance: list[float]  # per step: KL(p_without || p_with)
    counterfactual: list[float]  # per step: KL over the kept (different) rollouts only; NaN if none kept
    acc_counterfactual: list[float]  # per step: accuracy of the kept rollouts
    n_kept: list[int]
    rollouts_path: Path | None = None
    n_sampled: int = 0  # rollouts sampled by this call (the rest were read from rollouts_path)
    rollouts: list[list[Rollout]] = field(default_factory=list, repr=False)  # per prefix k, by index

    @property
    def acc_without(self) -> list[float]:
        return self.accuracy[:-1]

    @property
    def acc_with(self) -> list[float]:
        return self.accuracy[1:]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rollouts"}  # not asdict: no copies
        out["rollouts_path"] = None if self.rollouts_path is None else str(self.rollouts_path)
        return {**out, "acc_without": self.acc_without, "acc_with": self.acc_with}


def resample_steps(
    model: "HookedCoT",
    cot: CoT,
    n_rollouts: int = 100,
    *,
    temperature: float = 0.6,
    top_p: float | None = 0.95,
    top_k: int | None = None,
    max_new_tokens: int = 1024,
    seed: int = 0,
    stop_strings: Sequence[str] | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    similarity: Similarity | None = None,
    threshold: float = THRESHOLD,
    smoothing: float = SMOOTHING,
    memory_budget: int | None = None,
    fwd_hooks: Iterable = (),
    progress: bool = True,
) -> ResamplingResult:
    """Sample `n_rollouts` per prefix of `cot` and measure each step's importance (module docstring).

    With `out_dir`, rollouts go to `out_dir/rollouts.jsonl` as they finish and a later call with the
    same trace, model and parameters resumes: only the missing (prefix, index) pairs are sampled.
    Defaults follow Thought Anchors (temperature 0.6, top-p 0.95, 100 rollouts, threshold 0.8)."""
    if cot.embeds is not None:
        raise ValueError("resampling needs a token trace; this CoT has latent positions")
    sampling = Sampling(temperature, top_p, top_k, max_new_tokens, tuple(stop_strings or ()), stop_at_eos, eos_token_id)
    prefixes = [cot.prefix(k) for k in range(cot.n_steps + 1)]
    header = {
        "trace": trace_fingerprint(cot.tokens, [len(p) for p in prefixes]),
        "n_tokens": len(cot.tokens), "n_steps": cot.n_steps, "seed": seed, "sampling": sampling.to_dict(),
        "model": {"name": model.cfg.model_name, "dtype": str(model.dtype).removeprefix("torch.")},
    }
    store = RolloutStore(out_dir, header) if out_dir is not None else None
    have: dict[tuple[int | None, int], Rollout] = dict(store.done) if store else {}
    todo = {k: [i for i in range(n_rollouts) if (k, i) not in have] for k in range(len(prefixes))}
    n_sampled = 0
    try:
        with tqdm(total=sum(map(len, todo.values())), desc="rollouts", disable=not progress) as bar:
            for k, indices in todo.items():
                key = prefix_key(prefixes[k])
                jobs = [(i, rollout_seed(seed, key, i)) for i in indices]
                for r in run_prefix(model, prefixes[k], jobs, sampling, think=cot.think,
                                    memory_budget=memory_budget, fwd_hooks=fwd_hooks):
                    r.prefix = k
                    have[(k, r.index)] = r
                    if store is not None:
                        store.append(r)
                    n_sampled += 1
                    bar.update(1)
    finally:
        if store is not None:
            store.close()
    rollouts = [[have[(k, i)] for i in range(n_rollouts)] for k in range(len(prefixes))]
    if similarity is None:
        r0, r1 = cot.reasoning_tokens
        similarity = ResidualSimilarity(model, reference=cot.tokens[r0:r1] or cot.tokens)
    result = measure_importance(cot, rollouts, similarity, threshold, smoothing)
    result.rollouts_path = store.path if store is not None else None
    result.n_sampled = n_sampled
    return result


def measure_importance(cot: CoT, rollouts: list[list[Rollout]], similarity: Similarity,
                       threshold: float = THRESHOLD, smoothing: float = SMOOTHING) -> ResamplingResult:
    """The measures from rollouts already sampled: `rollouts[k]` are prefix k's (k = 0..n_steps)."""
    if len(rollouts) != cot.n_steps + 1:
        raise ValueError(f"need rollouts for {cot.n_steps + 1} prefixes (0..n_steps), got {len(rollouts)}")
    reference = cot.correct_answer or cot.answer
    rule = cot.meta.get("step_rule", "sentences")
    rule = rule if isinstance(rule, str) and (rule in ("sentences", "lines") or rule.startswith("re:")) else "sentences"
    answers = [[rollout_outcome(cot, k, r) for r in rs] for k, rs in enumerate(rollouts)]
    counts = [answer_counts(a) for a in answers]
    accuracy = [_accuracy(a, reference) for a in answers]
    firsts = [[first_step(r.text, rule) for r in rs] for rs in rollouts[:-1]]
    if hasattr(similarity, "prepare"):  # batch the vectors of every text it will see
        similarity.prepare([t for fs in firsts for t in fs if t] + [s.text for s in cot.steps])
    importance, counterfactual, acc_cf, n_kept = [], [], [], []
    for i, step in enumerate(cot.steps):
        importance.append(answer_kl(counts[i], counts[i + 1], smoothing))
        kept = [a for a, keep in zip(answers[i], keep_different(firsts[i], step.text, similarity, threshold)) if keep]
        counterfactual.append(answer_kl(answer_counts(kept), counts[i + 1], smoothing))
        acc_cf.append(_accuracy(kept, reference))
        n_kept.append(len(kept))
    return ResamplingResult(cot.step_texts, reference, len(rollouts[0]), threshold, smoothing, accuracy, counts,
                            importance, counterfactual, acc_cf, n_kept, rollouts=rollouts)


def rollout_outcome(cot: CoT, k: int, rollout: Rollout) -> str | None:
    """The answer a rollout of prefix k commits to, read from the whole reasoning it completes
    (the trace's reasoning before step k, then the rollout's text), as `CoT.answer` reads a trace:
    after the closing think delimiter when the rollout writes one; else from the reasoning itself —
    only an explicit answer (a box, "the answer is") when the rollout was cut off at
    `max_new_tokens` (its last number is then mid-reasoning), any answer otherwise. So a rollout
    of a prefix that already states the answer keeps it, and a cut-off one counts as no answer."""
    close = cot.think[1] if cot.think else None
    if close and close in rollout.text:
        before, after = rollout.text.rsplit(close, 1)
        if extract_answer(after) is not None:
            return extract_answer(after)
        text = _reasoning_before(cot, k) + before
    else:
        text = _reasoning_before(cot, k) + rollout.text
    return extract_answer(text, last_number=rollout.finish != "length")


def _reasoning_before(cot: CoT, k: int) -> str:
    """The trace's reasoning text before step k (what prefix k holds of it)."""
    r0 = cot.reasoning_chars[0]
    end = cot.steps[k].chars[0] if k < cot.n_steps else cot.reasoning_chars[1]
    return cot.text[r0:max(r0, end)]


def _accuracy(answers: Sequence[str | None], reference: str | None) -> float:
    if reference is None or not answers:
        return float("nan")
    return sum(answers_match(a, reference) for a in answers) / len(answers)
