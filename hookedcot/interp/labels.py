"""Labels for token positions, the same in every Result, plot and console line."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor


def token_labels(model: Any, tokens: Tensor | Sequence[int], positions: Sequence[int] | None = None) -> list[str]:
    """`"9 ' 4'"` for each position: the index, then the token as Python writes a string (so a
    space, a newline or an empty token can be seen). Without a tokenizer, the index alone."""
    ids = tokens.reshape(-1).tolist() if isinstance(tokens, Tensor) else list(tokens)
    positions = range(len(ids)) if positions is None else positions
    try:
        strs = model.to_str_tokens(ids)
    except ValueError:  # the model has no tokenizer
        return [str(p) for p in positions]
    return [f"{p} {strs[p]!r}" for p in positions]
