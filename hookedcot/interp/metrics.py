"""Metrics for patching, ablation and steering: pure torch, one value per row.

Every metric takes logits shaped [batch, vocab] or [batch, pos, vocab] (any leading shape) and
returns one value per leading entry — [batch] or [batch, pos] — so a batched sweep can score many
patched rows in one call; reduce over positions yourself (`.sum(-1)` / `.mean(-1)`). Everything
is computed in float32 whatever the model's dtype.

| metric | formula |
|---|---|
| `kl_divergence(p, q)` | KL(P‖Q) = Σ_v P(v) (log P(v) − log Q(v)), P = softmax(p), Q = softmax(q) |
| `l2_distance(a, b)` | ‖a − b‖₂ over the last axis |
| `top1_changed(a, b)` | 1 where argmax a ≠ argmax b, else 0 (its mean is the change rate) |
| `logit_difference(l, c, w)` | l[c] − l[w] |
| `answer_logprob(l, ids)` | Σ_i log softmax(l_i)[ids_i] (teacher forcing) |
| `answer_logit_difference` | answer_logprob(clean answer) − answer_logprob(corrupted answer) |
| `mean_token_logit_difference` | mean_i l[clean_i] − mean_j l[corrupt_j] at one position |
| `normalized_recovery(p, c, k)` | (p − c) / (k − c): 0 = corrupted, 1 = clean |
| `cosine_similarity(a, b)` | a·b / (‖a‖ ‖b‖) |

Metrics are nouns (the quantity they return); the tools that run things are verbs.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

Ids = Union[int, Sequence[int], Tensor]


def kl_divergence(
    p_logits: Float[Tensor, "... vocab"], q_logits: Float[Tensor, "... vocab"], direction: str = "p||q"
) -> Float[Tensor, "..."]:
    """KL divergence between the softmax distributions of two sets of logits, per row.

    direction "p||q": KL(P‖Q) = Σ_v P(v) (log P(v) − log Q(v)); "q||p" swaps them; "symmetric" is
    their sum. Computed from float32 log_softmax; entries where the first distribution is exactly 0
    (logit −inf) contribute 0. Always ≥ 0 (up to float rounding), 0 when the logits agree up to a
    constant. How far a patch moved the output from a baseline: `kl_divergence(patched, baseline)`.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"kl_divergence: logits shapes differ, {tuple(p_logits.shape)} vs {tuple(q_logits.shape)}")
    log_p = torch.log_softmax(p_logits.float(), dim=-1)
    log_q = torch.log_softmax(q_logits.float(), dim=-1)
    if direction == "p||q":
        return _kl(log_p, log_q)
    if direction == "q||p":
        return _kl(log_q, log_p)
    if direction == "symmetric":
        return _kl(log_p, log_q) + _kl(log_q, log_p)
    raise ValueError(f"direction must be 'p||q', 'q||p' or 'symmetric', got {direction!r}")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p == float("-inf"), torch.zeros_like(terms), terms).sum(-1)


def l2_distance(a: Float[Tensor, "... d"], b: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
    """‖a − b‖₂ over the last axis (logits or activations), in float32."""
    return torch.linalg.vector_norm(a.float() - b.float(), dim=-1)


def top1_changed(a: Float[Tensor, "... vocab"], b: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """1.0 where argmax(a) ≠ argmax(b), else 0.0; `.mean()` of it is the top-1 change rate."""
    return (a.argmax(-1) != b.argmax(-1)).float()


def _pick(logits: Tensor, ids: Ids) -> Tensor:
    """logits[..., ids] with one id for all rows, or one per leading row ([batch] or [batch, pos])."""
    ids = torch.as_tensor(ids, device=logits.device, dtype=torch.long)
    lead = logits.shape[:-1]
    if ids.dim() > len(lead):
        raise ValueError(f"token ids of shape {tuple(ids.shape)} do not fit logits of shape {tuple(logits.shape)}")
    ids = ids.reshape(tuple(ids.shape) + (1,) * (len(lead) - ids.dim())).expand(lead)
    return logits.gather(-1, ids[..., None])[..., 0]


def logit_difference(logits: Float[Tensor, "... vocab"], correct_id: Ids, wrong_id: Ids) -> Float[Tensor, "..."]:
    """logits[correct] − logits[wrong] per row. Ids are an int (all rows) or a tensor of one id per
    batch row ([batch]) or per row and position ([batch, pos])."""
    logits = logits.float()
    return _pick(logits, correct_id) - _pick(logits, wrong_id)


def answer_logprob(
    logits_at_answer_positions: Float[Tensor, "batch n vocab"],
    answer_ids: Int[Tensor, "batch n"] | Sequence[int],
    answer_mask: Int[Tensor, "batch n"] | None = None,
) -> Float[Tensor, " batch"]:
    """Summed log-probability of a (multi-token) answer under teacher forcing:
    Σ_i log softmax(logits_i)[answer_i], over the answer's tokens.

    Which logits: if the answer's tokens sit at positions s … s+n−1 of the sequence you ran
    (prompt + answer), the logits at positions s−1 … s+n−2 predict them — pass
    `logits[:, s-1 : s+n-1]` (see `answer_logits`). `answer_ids` is [batch, n] (or [n] for every
    row); `answer_mask` (1 = a real answer token) lets answers of different lengths share a batch.
    """
    logp = torch.log_softmax(logits_at_answer_positions.float(), dim=-1)
    ids = torch.as_tensor(answer_ids, device=logp.device, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None].expand(logp.shape[0], -1)
    if ids.shape != logp.shape[:-1]:
        raise ValueError(
            f"answer_ids {tuple(ids.shape)} must match the logits' [batch, n] = {tuple(logp.shape[:-1])}: "
            "one logit row per answer token (the row before each token predicts it)"
        )
    picked = logp.gather(-1, ids[..., None])[..., 0]
    if answer_mask is not None:
        picked = picked * answer_mask.to(picked.device, picked.dtype)
    return picked.sum(-1)


def answer_logits(logits: Float[Tensor, "batch pos vocab"], answer_start: int, n_answer: int) -> Tensor:
    """The logits that predict answer tokens at positions answer_start … answer_start+n_answer−1:
    `logits[:, answer_start-1 : answer_start+n_answer-1]` (the teacher-forcing shift)."""
    if answer_start < 1:
        raise ValueError("the answer must start after at least one prompt token (answer_start >= 1)")
    return logits[:, answer_start - 1 : answer_start + n_answer - 1]


def answer_logit_difference(
    logits: Float[Tensor, "batch n vocab"],
    clean_ids: Int[Tensor, "batch n"] | Sequence[int],
    corrupted_ids: Int[Tensor, "batch m"] | Sequence[int],
    corrupted_logits: Float[Tensor, "batch m vocab"] | None = None,
    clean_mask: Tensor | None = None,
    corrupted_mask: Tensor | None = None,
) -> Float[Tensor, " batch"]:
    """answer_logprob(clean answer) − answer_logprob(corrupted answer), per row: > 0 means the model
    prefers the clean answer.

    `logits` are the logits at the clean answer's positions (teacher-forced on prompt + clean
    answer). For multi-token answers the corrupted answer needs its own teacher-forced run (prompt
    + corrupted answer): pass its logits as `corrupted_logits`. Without it `logits` scores both —
    exact for single-token answers or when comparing first tokens only."""
    other = logits if corrupted_logits is None else corrupted_logits
    return answer_logprob(logits, clean_ids, clean_mask) - answer_logprob(other, corrupted_ids, corrupted_mask)


def mean_token_logit_difference(
    logits: Float[Tensor, "... vocab"], clean_ids: Sequence[int] | Tensor, corrupted_ids: Sequence[int] | Tensor
) -> Float[Tensor, "..."]:
    """mean(logits[clean answer's token ids]) − mean(logits[corrupted answer's token ids]) at the
    same position(s), ids shared by all rows: an answer logit difference that needs no teacher
    forcing, for answers that are several tokens."""
    logits = logits.float()
    clean = torch.as_tensor(clean_ids, device=logits.device, dtype=torch.long).reshape(-1)
    corrupt = torch.as_tensor(corrupted_ids, device=logits.device, dtype=torch.long).reshape(-1)
    return logits[..., clean].mean(-1) - logits[..., corrupt].mean(-1)


def normalized_recovery(
    patched: Tensor | float, corrupted: Tensor | float, clean: Tensor | float, on_equal: str = "nan"
) -> Tensor:
    """(patched − corrupted) / (clean − corrupted), elementwise (broadcasting): 0 = the corrupted
    baseline, 1 = fully back to clean, < 0 or > 1 = overshoot.

    Where clean == corrupted exactly the ratio is undefined (there is nothing to recover):
    `on_equal="nan"` (default) returns NaN there — never ±inf — so `torch.nanmean` skips those
    rows; "zero" returns 0; "raise" raises ValueError. A tiny but non-zero gap is kept as is.
    """
    p, c, k = (torch.as_tensor(t).float() for t in (patched, corrupted, clean))
    gap = k - c
    same = gap == 0
    if on_equal not in ("nan", "zero", "raise"):
        raise ValueError(f"on_equal must be 'nan', 'zero' or 'raise', got {on_equal!r}")
    if on_equal == "raise" and bool(same.any()):
        raise ValueError(f"normalized_recovery: clean == corrupted at {int(same.sum())} entries; nothing to recover")
    ratio = (p - c) / torch.where(same, torch.ones_like(gap), gap)
    fill = float("nan") if on_equal == "nan" else 0.0
    return torch.where(same, torch.full_like(ratio, fill), ratio)


def cosine_similarity(a: Float[Tensor, "... d"], b: Float[Tensor, "... d"], eps: float = 1e-8) -> Float[Tensor, "..."]:
    """a·b / (‖a‖ ‖b‖) over the last axis, in float32 (0 where either vector is zero)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=eps)
