"""Forced answering: cut the reasoning after each step, force the answer, read what the model says.

After step k (k = 0 is before the first step, k = n_steps after the last) the forcing string is
appended (by default in Thought Anchors' style: `</think>\\n\\nTherefore, the final answer is
\\boxed{`; without think delimiters the `</think>` is left out) and the model's next-token
distribution, the log-probability of the answer's tokens (teacher forced, summed) and a short
greedy answer are read. A step's forced importance is how much it moves the answer's
log-probability: `logprob[k + 1] - logprob[k]`.

All cut points run as one batch on the trace's own KV cache: the whole reasoning is run once,
the cache is copied to the rows, and row k attends to the first `end_k` cached positions only
(an attention mask blanks the rest), with its forcing and answer tokens written after the trace
and rotary positions `end_k, end_k + 1, ...` (the mask's running count gives exactly these). So
each row equals a direct forward of `prefix(k) + forcing + answer`, at the cost of the forcing
and answer tokens alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hookedcot.cot.answers import answers_match, extract_answer
from hookedcot.cot.trace import CoT
from hookedcot.kv_cache import KVCache

FORCING = "\n\nTherefore, the final answer is \\boxed{"


def default_forcing(cot: CoT) -> str:
    """The paper's forcing string, closing the think block when the trace has one."""
    return (cot.think[1] if cot.think else "") + FORCING


@dataclass
class ForcedAnswers:
    """Per cut point k = 0..n_steps (before step 0, after each step)."""

    forcing: str
    answer: str | None  # the answer scored (the correct one if known, else the trace's own)
    cut_tokens: list[int]  # tokens kept before the forcing string, per cut point
    logprob: list[float]  # log p(answer tokens | prefix + forcing), summed over the answer's tokens
    top_tokens: list[list[tuple[str, float]]]  # the next-token distribution after the forcing string
    forced_answer: list[str | None]  # the greedy answer, extracted from forcing + greedy tokens
    correct: list[bool | None] = field(default_factory=list)

    @property
    def importance(self) -> list[float]:
        """Per step: the change in the answer's log-probability the step makes."""
        return [b - a for a, b in zip(self.logprob, self.logprob[1:])]

    def to_dict(self) -> dict[str, Any]:
        return {"forcing": self.forcing, "answer": self.answer, "cut_tokens": self.cut_tokens,
                "logprob": self.logprob, "importance": self.importance, "top_tokens": self.top_tokens,
                "forced_answer": self.forced_answer, "correct": self.correct}


@torch.inference_mode()
def force_answers(
    model: Any,
    cot: CoT,
    *,
    forcing: str | None = None,
    answer: str | None = None,
    answer_tokens: int = 8,
    top_k: int = 5,
    memory_budget: int = 1 << 30,
) -> ForcedAnswers:
    """Force an answer after every step of `cot` (see the module docstring). `answer` defaults to
    `cot.correct_answer`, else the trace's own answer; `answer_tokens` greedy tokens are decoded to
    read the forced answer (0: none); rows are batched so their KV caches fit `memory_budget` bytes."""
    if cot.embeds is not None:
        raise ValueError("forced answering needs a token trace; this CoT has latent positions (use its embeds directly)")
    tok = model._require_tokenizer()
    forcing = default_forcing(cot) if forcing is None else forcing
    answer = answer if answer is not None else (cot.correct_answer or cot.answer)
    forcing_ids = tok.encode(forcing, add_special_tokens=False)
    answer_ids = tok.encode(answer, add_special_tokens=False) if answer else []
    in_context = tok.encode(forcing + answer, add_special_tokens=False) if answer else []
    if in_context[: len(forcing_ids)] == forcing_ids:  # the answer as it tokenizes after the forcing string
        answer_ids = in_context[len(forcing_ids):]
    if not forcing_ids:
        raise ValueError("the forcing string is empty; the answer needs a position to be read from")
    ends = [len(cot.prefix(k)) for k in range(cot.n_steps + 1)]
    trace = torch.tensor(cot.tokens[: ends[-1]], device=model.device)[None]
    extra = len(forcing_ids) + max(len(answer_ids), answer_tokens)
    cache = KVCache(model.cfg, 1, trace.shape[1] + extra, model.dtype, model.device)
    model(trace, past_kv=cache, return_type=None)
    per_row = 2 * cache.keys[:, 0].numel() * cache.keys.element_size()
    rows_per_batch = max(1, memory_budget // max(per_row, 1))
    out = ForcedAnswers(forcing, answer, ends, [], [], [], [])
    for lo in range(0, len(ends), rows_per_batch):
        _force_batch(model, cache, ends[lo : lo + rows_per_batch], forcing_ids, answer_ids, answer_tokens, top_k, out)
    out.correct = [None if answer is None or a is None else answers_match(a, answer) for a in out.forced_answer]
    return out


def _force_batch(model: Any, trace_cache: KVCache, ends: list[int], forcing_ids: list[int], answer_ids: list[int],
                 answer_tokens: int, top_k: int, out: ForcedAnswers) -> None:
    """One batch of cut points on copies of the trace's cache; appends to `out`."""
    tok = model.tokenizer
    rows, trace_len, dev = len(ends), trace_cache.length, model.device
    cache = trace_cache.select_rows(torch.zeros(rows, dtype=torch.long, device=dev))
    kept = (torch.arange(trace_len, device=dev)[None] < torch.tensor(ends, device=dev)[:, None]).long()
    new = torch.tensor(forcing_ids + answer_ids, device=dev)[None].expand(rows, -1)
    mask = torch.cat([kept, torch.ones_like(new)], dim=1)
    logits = model(new, attention_mask=mask, past_kv=cache).float()
    logp = logits.log_softmax(-1)
    f = len(forcing_ids)
    for r in range(rows):
        targets = torch.tensor(answer_ids, device=dev)
        score = logp[r, f - 1 : f - 1 + len(answer_ids)].gather(-1, targets[:, None]).sum() if answer_ids else torch.tensor(float("nan"))
        out.logprob.append(float(score))
        probs, ids = logp[r, f - 1].exp().topk(top_k)
        out.top_tokens.append([(s, float(p)) for s, p in zip(tok.token_strings(ids.tolist()), probs.tolist())])
    if answer_tokens <= 0:
        out.forced_answer.extend([None] * rows)
        return
    cache.truncate(trace_len + f)  # forget the answer's tokens; decode greedily after the forcing string
    mask = mask[:, : trace_len + f]
    next_ids = logits[:, f - 1].argmax(-1)
    decoded = [next_ids]
    for _ in range(answer_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        next_ids = model(next_ids[:, None], attention_mask=mask, past_kv=cache, last_logits_only=True)[:, -1].argmax(-1)
        decoded.append(next_ids)
    texts = [tok.decode(row.tolist()) for row in torch.stack(decoded, dim=1)]
    forcing = out.forcing
    out.forced_answer.extend(extract_answer(forcing + t) if "{" in forcing else extract_answer(t) for t in texts)
