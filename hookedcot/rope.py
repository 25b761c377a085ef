"""Rotary position embeddings: inverse-frequency inits in a registry keyed by `rope_type`.

The numbers follow transformers' `ROPE_INIT_FUNCTIONS` op for op (float32 throughout, cos/sin
cast to the activation dtype at the end) so logits match HF bit for bit where the op order does.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

InvFreqInit = Callable[[int, float, dict[str, Any]], Tensor]


def _default_inv_freq(d_head: int, theta: float, scaling: dict[str, Any]) -> Tensor:
    # Always on the CPU (also inside a meta-device context): tiny, and needed with real values.
    return 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64, device="cpu").float() / d_head))


def _linear_inv_freq(d_head: int, theta: float, scaling: dict[str, Any]) -> Tensor:
    return _default_inv_freq(d_head, theta, scaling) / float(scaling["factor"])


def _llama3_inv_freq(d_head: int, theta: float, scaling: dict[str, Any]) -> Tensor:
    """LLaMA-3.1+ frequency-dependent scaling: long wavelengths divided by `factor`, short ones
    kept, a smooth blend between (Meta's reference; same ops as transformers)."""
    inv_freq = _default_inv_freq(d_head, theta, scaling)
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


# rope_type -> (inverse-frequency init, the scaling keys it needs)
ROPE_TYPES: dict[str, tuple[InvFreqInit, tuple[str, ...]]] = {
    "default": (_default_inv_freq, ()),
    "linear": (_linear_inv_freq, ("factor",)),
    "llama3": (
        _llama3_inv_freq,
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    ),
}


def rope_scaling_problems(scaling: dict[str, Any] | None) -> list[str]:
    """What is wrong with a rope_scaling dict (empty when it is usable): an unknown `rope_type`
    or a key its init needs. ModelConfig raises these; rope.py itself imports nothing of ours."""
    if scaling is None:
        return []
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        return [f"rope_scaling.rope_type={rope_type!r} is not supported; supported rope types: {', '.join(sorted(ROPE_TYPES))}"]
    missing = [key for key in ROPE_TYPES[rope_type][1] if key not in scaling]
    return [f"rope_scaling of type {rope_type!r} is missing {', '.join(missing)}"] if missing else []


def inv_freq(d_head: int, theta: float, scaling: dict[str, Any] | None) -> Tensor:
    """Float32 inverse frequencies, shape [d_head // 2]."""
    scaling = scaling or {}
    init, _ = ROPE_TYPES[scaling.get("rope_type", "default")]
    return init(d_head, theta, scaling)


def rotary_cos_sin(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of shape [batch, pos, d_head] for integer `position_ids` [batch, pos]."""
    freqs = position_ids[:, :, None].float() * inv_freq.float()[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_tables(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, signed sin), each [batch, pos, 1, d_head], built once per forward for every layer.

    The signed sin is (-sin, +sin) over the two halves, so `apply_rotary` swaps halves without
    negating x: (-x2) * s and x2 * (-s) are the same float, so the result is transformers' bit
    for bit, with two fewer ops per call."""
    cos, sin = rotary_cos_sin(inv_freq, position_ids, dtype)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, :, None, :], signed_sin[:, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate x [batch, pos, heads, d_head] by `rotary_tables` [batch, pos, 1, d_head]:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin
