"""Labels for token positions, the same in every Result, plot and console line."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor


def token_labels(model: Any, tokens: Tensor | Sequence[int] | None, positions: Sequence[int] | None = None) -> list[str]:
    """`"9 ' 4'"` for each position: the index, then the token as Python writes a string (so a
    space, a newline or an empty token can be seen). Without a tokenizer or tokens, the index alone."""
    if tokens is None:  # both runs given as input embeddings (latent positions): no token to show
        if positions is None:
            raise ValueError("token_labels needs the tokens, or the positions to label by index")
        return [str(p) for p in positions]
    if isinstance(tokens, Tensor) and tokens.dim() == 2 and tokens.shape[0] != 1:
        raise ValueError(f"token_labels labels one sequence; got a batch of {tokens.shape[0]}: pass tokens[i]")
    ids = tokens.reshape(-1).tolist() if isinstance(tokens, Tensor) else list(tokens)
    positions = range(len(ids)) if positions is None else positions
    try:
        strs = model.to_str_tokens(ids)
    except ValueError:  # the model has no tokenizer
        return [str(p) for p in positions]
    return [f"{p} {strs[p]!r}" for p in positions]
