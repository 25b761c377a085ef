"""Autoregressive decoding with a preallocated KV cache and live hooks.

The prompt is run once (hooks see every prompt position), then one position per step (hooks see
only the new position; `hook.positions` says where it is in the sequence). Left-padded batches,
greedy or seeded sampling (temperature, top-k, top-p), stop on eos or stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.kv_cache import KVCache
from hookedcot.kernels import decode_kernels

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy decoding)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def pick_next(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Next token per row from last-position logits [b, vocab]."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > sampling.top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(
    model: "HookedCoT",
    input: str | Sequence[str] | Tensor,
    max_new_tokens: int = 64,
    *,
    attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    fwd_hooks: Iterable = (),
    use_cache: bool = True,
    on_token: Callable[[int, Tensor], None] | None = None,
    verbose: bool = False,
    return_type: str = "input",
) -> Tensor | str | list[str]:
    """Generate up to `max_new_tokens` per row; see `HookedCoT.generate`."""
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    sampling.validate()
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    text_in = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
    if text_in:
        tokens, mask = model.tokenize(input)
    else:
        tokens = (input[None] if input.dim() == 1 else input).to(model.device)
        mask = attention_mask.to(model.device) if attention_mask is not None else torch.ones_like(tokens)
    b, p0 = tokens.shape
    stop_ids = _stop_ids(model, eos_token_id) if stop_at_eos else []
    pad_id = _pad_id(model, stop_ids)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    total = p0 + max_new_tokens
    out = torch.full((b, total), pad_id, dtype=torch.long, device=model.device)
    out[:, :p0] = tokens
    full_mask = torch.ones((b, total), dtype=torch.long, device=model.device)
    full_mask[:, :p0] = mask
    finished = torch.zeros(b, dtype=torch.bool, device=model.device)
    stop_tensor = torch.tensor(stop_ids, device=model.device, dtype=torch.long)
    cache = KVCache(model.cfg, b, total, model.dtype, model.device) if use_cache else None

    with model.hooks(fwd_hooks), decode_kernels(model):
        logits = model(tokens, attention_mask=mask, past_kv=cache, last_logits_only=True)[:, -1]
        n = 0
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generating", leave=False):
            next_tokens = pick_next(logits, sampling, generator)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
            out[:, p0 + step] = next_tokens
            full_mask[:, p0 + step] = (~finished).long()
            n = step + 1
            if on_token is not None:
                on_token(step, next_tokens)
            if len(stop_ids):
                finished |= torch.isin(next_tokens, stop_tensor)
            if stop_strings:
                finished |= _hit_stop_string(model, out[:, p0 : p0 + n], stop_strings)
            if bool(finished.all()) or n == max_new_tokens:
                break
            if cache is not None:
                step_in, step_mask = next_tokens[:, None], full_mask[:, : p0 + n]
            else:
                step_in, step_mask = out[:, : p0 + n], full_mask[:, : p0 + n]
            logits = model(step_in, attention_mask=step_mask, past_kv=cache, last_logits_only=True)[:, -1]
    result = out[:, : p0 + n]
    if return_type == "tokens" or (return_type == "input" and not text_in):
        return result
    if return_type not in ("input", "str"):
        raise ValueError(f"return_type must be 'input', 'tokens' or 'str', got {return_type!r}")
    texts = [model.tokenizer.decode([t for t, m in zip(row.tolist(), mrow.tolist()) if m]) for row, mrow in zip(result, full_mask)]
    return texts[0] if isinstance(input, str) else texts


def _stop_ids(model: "HookedCoT", eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    tok = model.tokenizer
    if tok is not None and getattr(tok, "eos_token_ids", None):
        return list(tok.eos_token_ids)
    eos = model.cfg.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _pad_id(model: "HookedCoT", stop_ids: list[int]) -> int:
    tok = model.tokenizer
    if tok is not None and getattr(tok, "pad_token_id", None) is not None:
        return tok.pad_token_id
    if model.cfg.pad_token_id is not None:
        return model.cfg.pad_token_id
    return stop_ids[0] if stop_ids else 0


def _hit_stop_string(model: "HookedCoT", generated: Tensor, stop_strings: Sequence[str]) -> Tensor:
    tok = model._require_tokenizer()
    hits = [any(s in tok.decode(row.tolist()) for s in stop_strings) for row in generated]
    return torch.tensor(hits, device=generated.device)
