"""TransformerLens' head detector: score every attention head against an expected attention pattern.

    from hookedcot.head_detector import detect_head     # was: from transformer_lens.head_detector import ...
    scores = detect_head(model, "one two three one two three", "induction_head")   # [n_layers, n_heads]

Same functions, arguments, scores and error messages as `transformer_lens.head_detector`. Two
differences: the forward records only the attention patterns (hookedcot computes a pattern only when a
hook asks for it), and a `cache` you pass in is read, never written (TransformerLens' `"mul"` measure
zeroes the BOS column / diagonal of the cached pattern in place).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Dict, List, Literal, Optional, Tuple, Union, cast, get_args

import numpy as np
import torch
from jaxtyping import TypeCheckError

from hookedcot.utils import is_lower_triangular, is_square

if TYPE_CHECKING:
    from hookedcot.cache import ActivationCache
    from hookedcot.hooked import HookedCoT

__all__ = [
    "HeadName", "HEAD_NAMES", "ErrorMeasure", "LayerHeadTuple", "LayerToHead", "detect_head",
    "get_previous_token_head_detection_pattern", "get_duplicate_token_head_detection_pattern",
    "get_induction_head_detection_pattern", "get_supported_heads", "compute_head_attention_similarity_score",
]

HeadName = Literal["previous_token_head", "duplicate_token_head", "induction_head"]
HEAD_NAMES = cast(List[HeadName], list(get_args(HeadName)))
ErrorMeasure = Literal["abs", "mul"]

LayerHeadTuple = Tuple[int, int]
LayerToHead = Dict[int, List[int]]

INVALID_HEAD_NAME_ERR = f"detection_pattern must be a Tensor or one of head names: {HEAD_NAMES}; got %s"
SEQ_LEN_ERR = "The sequence must be non-empty and must fit within the model's context window."
DET_PAT_NOT_SQUARE_ERR = (
    "The detection pattern must be a lower triangular matrix of shape (sequence_length, sequence_length); "
    "sequence_length=%d; got detection pattern of shape %s"
)

_PATTERNS = {
    "previous_token_head": lambda tokens: get_previous_token_head_detection_pattern(tokens),
    "duplicate_token_head": lambda tokens: get_duplicate_token_head_detection_pattern(tokens),
    "induction_head": lambda tokens: get_induction_head_detection_pattern(tokens),
}


def detect_head(
    model: "HookedCoT",
    seq: Union[str, List[str]],
    detection_pattern: Union[torch.Tensor, HeadName],
    heads: Optional[Union[List[LayerHeadTuple], LayerToHead]] = None,
    cache: Optional["ActivationCache"] = None,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = "mul",
) -> torch.Tensor:
    """Score each attention head ([n_layers, n_heads]) against `detection_pattern`.

    `detection_pattern` is a lower-triangular (seq_len, seq_len) tensor of the attention you expect,
    or one of `HEAD_NAMES` (the pattern is then built from `seq`'s tokens; a list of strings is
    scored one string at a time and the scores averaged). `"mul"`: the share of each head's attention
    that falls where the pattern is 1 (the pattern should hold only 0s and 1s). `"abs"`: 1 minus the
    summed-per-row mean absolute difference, rounded to 3 places (1 = perfect match). Heads not in
    `heads` (a list of (layer, head) or a {layer: [heads]} dict) score -1. `exclude_bos` /
    `exclude_current_token` leave attention to position 0 / to the query's own position out.
    """
    cfg = model.cfg
    tokens = model.to_tokens(seq).to(cfg.device)
    seq_len = tokens.shape[-1]

    assert error_measure in get_args(ErrorMeasure), (
        f"Invalid error_measure={error_measure}; valid values are {get_args(ErrorMeasure)}"
    )

    if isinstance(detection_pattern, str):
        if isinstance(seq, str):  # checked first: a named pattern cannot be built for no tokens
            assert 1 < seq_len < cfg.n_ctx, SEQ_LEN_ERR
        if detection_pattern not in HEAD_NAMES:
            # TransformerLens' HeadName Literal rejects it at its runtime type check.
            raise TypeCheckError(INVALID_HEAD_NAME_ERR % detection_pattern)
        if isinstance(seq, list):
            batch_scores = [
                detect_head(model, one, detection_pattern, heads, exclude_bos=exclude_bos,
                            exclude_current_token=exclude_current_token, error_measure=error_measure)
                for one in seq
            ]
            return torch.stack(batch_scores).mean(0)
        detection_pattern = _PATTERNS[detection_pattern](tokens.cpu()).to(cfg.device)
    elif not isinstance(detection_pattern, torch.Tensor):
        raise TypeCheckError(INVALID_HEAD_NAME_ERR % (detection_pattern,))

    if error_measure == "mul" and not set(detection_pattern.unique().tolist()).issubset({0, 1}):
        logging.warning("Using detection pattern with values other than 0 or 1 with error_measure 'mul'")

    assert 1 < seq_len < cfg.n_ctx, SEQ_LEN_ERR
    assert is_lower_triangular(detection_pattern) and seq_len == detection_pattern.shape[0], (
        DET_PAT_NOT_SQUARE_ERR % (seq_len, detection_pattern.shape)
    )

    if cache is None:
        _, cache = model.run_with_cache(
            tokens, remove_batch_dim=True, names_filter=lambda name: name.endswith("attn.hook_pattern")
        )

    if heads is None:
        layer2heads: LayerToHead = {layer: list(range(cfg.n_heads)) for layer in range(cfg.n_layers)}
    elif isinstance(heads, list):
        layer2heads = defaultdict(list)
        for layer, head in heads:
            layer2heads[layer].append(head)
    else:
        layer2heads = heads

    matches = -torch.ones(cfg.n_layers, cfg.n_heads, dtype=torch.float32)
    for layer, layer_heads in layer2heads.items():
        patterns = cache["pattern", layer, "attn"]
        if patterns.ndim == 4:  # a cache recorded with its batch axis
            patterns = patterns[0]
        for head in layer_heads:
            pattern = patterns[head].float().clone()
            matches[layer, head] = compute_head_attention_similarity_score(
                pattern,
                detection_pattern=detection_pattern.to(pattern.device, torch.float32),
                exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token,
                error_measure=error_measure,
            )
    return matches.to(cfg.dtype) if getattr(cfg, "dtype", None) is not None else matches


def get_previous_token_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[pos, pos] pattern with 1s just below the diagonal (each token attends to the one before)."""
    n = tokens.shape[-1]
    pattern = torch.zeros(n, n)
    pattern[1:, :-1] = torch.eye(n - 1)
    return torch.tril(pattern)


def get_duplicate_token_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[pos, pos] pattern with a 1 where the key is an earlier copy of the query's token."""
    token_pattern = tokens.reshape(-1).cpu().repeat(tokens.shape[-1], 1).numpy()
    eq_mask = np.equal(token_pattern, token_pattern.T).astype(int)
    np.fill_diagonal(eq_mask, 0)  # every token duplicates itself; ignore that
    return torch.tril(torch.as_tensor(eq_mask).float())


def get_induction_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[pos, pos] pattern with a 1 on the token after an earlier copy of the query's token."""
    duplicate = get_duplicate_token_head_detection_pattern(tokens)
    shifted = torch.roll(duplicate, shifts=1, dims=1)
    result = torch.cat((torch.zeros(duplicate.shape[0], 1), shifted[:, 1:]), dim=1)
    return torch.tril(result)


def get_supported_heads() -> None:
    """Print the supported head names."""
    print(f"Supported heads: {HEAD_NAMES}")


def compute_head_attention_similarity_score(
    attention_pattern: torch.Tensor,
    detection_pattern: torch.Tensor,
    *,
    exclude_bos: bool,
    exclude_current_token: bool,
    error_measure: ErrorMeasure,
) -> float:
    """Similarity of one head's [q_pos, k_pos] pattern to `detection_pattern` (modifies `attention_pattern`)."""
    assert is_square(attention_pattern), f"Attention pattern is not square; got shape {attention_pattern.shape}"

    if error_measure == "mul":
        if exclude_bos:
            attention_pattern[:, 0] = 0
        if exclude_current_token:
            attention_pattern.fill_diagonal_(0)
        score = attention_pattern * detection_pattern
        return (score.sum() / attention_pattern.sum()).item()

    abs_diff = (attention_pattern - detection_pattern).abs()
    assert (abs_diff - torch.tril(abs_diff)).sum() == 0
    size = len(abs_diff)
    if exclude_bos:
        abs_diff[:, 0] = 0
    if exclude_current_token:
        abs_diff.fill_diagonal_(0)
    return 1 - round((abs_diff.mean() * size).item(), 3)
