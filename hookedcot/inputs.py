"""What a call hands the model, checked once at its entry: token ids, lengths, attention masks,
position ids, generation prompts.

Why here and not at the hook points: a hook point must cost one dict lookup when nobody listens,
so nothing is validated per layer; everything that can be wrong with the inputs is caught before
the first block runs, which also means a rejected call changes nothing (no KV cache advanced, no
hook left attached). Each check costs at most one host-device synchronisation per call.

Behaviour, one line each (the README's input table):
- token ids outside [0, d_vocab) -> `InputError` naming the first bad id and where it is;
- no positions and no cached prefix (an empty prompt) -> `InputError`; a batch of 0 rows runs and
  returns empty results ([0, pos, d_vocab] logits), so a filtered batch that came out empty needs
  no special case;
- more positions than `cfg.n_ctx` (cached + new) -> `InputError`;
- an attention mask of the wrong shape, with values other than 0/1, or with a row of zeros ->
  `InputError`; right padding in a forward gives the same logits at the real positions as each
  row run alone (attention is causal, so pads after a token are never seen); `generate` rejects
  right padding, because it would continue each row after its pads;
- position ids of the wrong shape or negative -> `InputError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hookedcot.errors import HookedCoTError


class InputError(HookedCoTError, ValueError):
    """An argument of a model call (token ids, mask, positions, length) cannot run as given. A
    ValueError, so `except ValueError` code written before it existed still catches it."""


def check_tokens(tokens: Tensor, d_vocab: int) -> None:
    """Token ids [batch, pos] must index the embedding."""
    if not tokens.numel():
        return
    bad = (tokens < 0) | (tokens >= d_vocab)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        raise InputError(
            f"token ids must lie in [0, {d_vocab}) (the model's vocabulary); got {int(tokens[tuple(where)])} "
            f"at [batch, pos] = {where} ({int(bad.sum())} bad ids in all). Ids from another model's tokenizer? "
            "Tokenize with this model (model.to_tokens / model.tokenize)."
        )


def check_length(batch: int, n_new: int, past_len: int, n_ctx: int) -> None:
    """A forward needs positions to run and must fit the model's context."""
    if n_new == 0 and past_len == 0 and batch > 0:
        raise InputError(
            "nothing to run: the input has no positions (an empty prompt?). Give at least one token, "
            "e.g. text with prepend_bos=True, which starts with the BOS token."
        )
    if past_len + n_new > n_ctx:
        raise InputError(
            f"the sequence would be {past_len + n_new} positions ({past_len} cached + {n_new} new) but the "
            f"model's context is cfg.n_ctx = {n_ctx}. Truncate the input (model.to_tokens(..., truncate=True)) "
            f"or generate fewer tokens; if you know the model extrapolates, raise the limit: "
            f"model.cfg = model.cfg.replace(n_ctx=...)."
        )


def check_attention_mask(mask: Tensor, batch: int, past_len: int, n_new: int) -> bool:
    """Shape (batch, cached + new positions), values 0/1, at least one token per row. Returns
    whether the mask is all ones (then the forward drops it: no padding to handle)."""
    expected = (batch, past_len + n_new)
    if tuple(mask.shape) != expected:
        raise InputError(
            f"attention_mask has shape {tuple(mask.shape)}; expected {expected} (batch, cached positions + "
            "new positions): with past_kv the mask covers the cached prefix too."
        )
    if not mask.numel():
        return True
    nonzero = mask != 0
    binary, rows_ok, all_ones = torch.stack(
        [(nonzero == (mask == 1)).all(), nonzero.any(-1).all(), nonzero.all()]
    ).tolist()
    if not binary:
        raise InputError(
            "attention_mask must hold 0 (padding) and 1 (token) only; got values "
            f"{sorted(set(mask.unique().tolist()))[:6]}. Position ids are counted from the mask, so other "
            "values would move every later position."
        )
    if not rows_ok:
        empty = [int(i) for i in (~nonzero.any(-1)).nonzero()[:, 0]]
        raise InputError(
            f"attention_mask rows {empty[:8]} are all zeros: those rows have no token to attend to (empty "
            "prompts in a batch?). Drop them, or give each row at least one token."
        )
    return bool(all_ones)


def check_position_ids(position_ids: Tensor, batch: int, n_new: int) -> None:
    """Explicit position ids: one per new position and row, never negative."""
    if tuple(position_ids.shape) != (batch, n_new):
        raise InputError(
            f"position_ids has shape {tuple(position_ids.shape)}; expected {(batch, n_new)} (one rotary "
            "position per row and new position)"
        )
    if position_ids.is_floating_point() or position_ids.dtype == torch.bool:
        raise InputError(f"position_ids must be integers, got {position_ids.dtype}")
    if position_ids.numel() and int(position_ids.min()) < 0:
        raise InputError(f"position_ids must be >= 0; got {int(position_ids.min())}")


def check_generate_prompt(input: Any, attention_mask: Tensor | None, max_new_tokens: int, n_ctx: int) -> None:
    """What `generate` can check before tokenizing: a token-id prompt must have positions and fit
    the context with the new tokens; a given mask must be left-padded (each row's next token is
    read at the last position, so a right-padded row would continue after its pads)."""
    if isinstance(input, Tensor) and input.dim() >= 1:
        p0 = input.shape[1] if input.dim() >= 2 else input.shape[0]
        if p0 == 0:
            raise InputError("generate needs a prompt of at least one position; got an empty one")
        if p0 + max_new_tokens > n_ctx:
            raise InputError(
                f"the prompt ({p0} positions) + max_new_tokens ({max_new_tokens}) exceed the model's context "
                f"cfg.n_ctx = {n_ctx}; ask for at most {max(n_ctx - p0, 0)} new tokens or shorten the prompt"
            )
    if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 and attention_mask.shape[1] > 1:
        m = attention_mask != 0
        right_padded = (m[:, :-1] & ~m[:, 1:]).any(-1)  # a token followed by a pad
        if bool(right_padded.any()):
            rows = [int(i) for i in right_padded.nonzero()[:, 0]]
            raise InputError(
                f"generate needs left padding; attention_mask rows {rows[:8]} have padding after a token "
                "(right padding), so generation would continue after the pads. Pad on the left "
                "(model.to_tokens(..., padding_side='left') or tokenizer.padding_side = 'left')."
            )
