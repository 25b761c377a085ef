"""Noise corruption for causal tracing / restoration: seeded Gaussian noise as a hook builder.

    noisy = add_noise("hook_embed", sigma=3.0, positions=range(4, 9), seed=0,
                      relative_to_embedding_std=True, model=model)    # ROME-style: 3 × std(W_E)
    corrupted_logits = model.run_with_hooks(tokens, fwd_hooks=[noisy])
    noisy0 = add_noise("blocks.0.hook_resid_post", sigma=2.0)          # a fixed σ on a residual

The noise is deterministic: the noise added at absolute position t depends only on (`seed`, t)
and the activation's shape, not on which other positions the pass covers — so a full forward and
KV-cached generation (which sees one new position per step) corrupt position t identically, and
two calls with the same seed corrupt identically. It is drawn on the CPU in float32 (the same
numbers on every device), scaled by σ, added in float32, and cast back to the activation's dtype.
Each batch row gets its own noise. σ = 0 is the exact identity (the hook returns None).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hookedcot.hook_names import spec_of
from hookedcot.interp.positions import PositionSpec, Positions, position_axis
from hookedcot.interp.renamed import renamed

_MIX = 0x9E3779B97F4A7C15  # golden-ratio multiplier: spreads (seed, position) over seed space


def add_noise(
    name: str,
    sigma: float,
    positions: PositionSpec = None,
    seed: int = 0,
    relative_to_embedding_std: bool = False,
    model: Any = None,
) -> tuple[str, Any]:
    """A (name, hook_fn) pair adding N(0, σ²) noise to hook `name` at `positions` (absolute
    indices, any form positions.py documents). With `relative_to_embedding_std=True`, σ is in units of the
    standard deviation of all entries of the embedding matrix `model.W_E` (pass `model`)."""
    if position_axis(name) != 1:
        raise ValueError(f"add_noise needs a [batch, pos, ...] hook; {name} is {spec_of(name).shape}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    scale = float(sigma)
    if relative_to_embedding_std:
        if model is None:
            raise ValueError("relative_to_embedding_std=True needs model= (for the std of model.W_E)")
        scale *= float(model.W_E.detach().float().std())
    select = Positions(positions)
    last: dict[str, Any] = {}  # the previous call's noise, reused when the next call looks the same

    def hook_fn(x: Tensor, hook: Any) -> Tensor | None:
        if scale == 0:
            return None
        pos_mask = select(hook.positions)
        key = (tuple(hook.positions.tolist()), tuple(x.shape), x.device,
               None if pos_mask is None else tuple(pos_mask.tolist()))
        if last.get("key") != key:
            last["key"], last["noise"] = key, _noise(x.shape, hook.positions, pos_mask, seed).to(x.device)
        noisy = (x.float() + scale * last["noise"]).to(x.dtype)
        if pos_mask is None:
            return noisy
        mask = pos_mask.to(x.device).reshape(1, -1, *([1] * (x.dim() - 2)))
        return torch.where(mask, noisy, x)

    return name, hook_fn


def _noise(shape: torch.Size, positions: Tensor, pos_mask: Tensor | None, seed: int) -> Tensor:
    """Standard normal noise [b, p, ...]: position t's slice drawn from a generator seeded by (seed, t),
    the same in every batch row (a batched patching sweep repeats one corrupted run along the batch)."""
    noise = torch.zeros(shape, dtype=torch.float32)
    per_pos = tuple(shape[2:])
    chosen = range(len(positions)) if pos_mask is None else pos_mask.nonzero().reshape(-1).tolist()
    pos_list = positions.tolist()
    for i in chosen:
        gen = torch.Generator().manual_seed((seed * _MIX + pos_list[i]) % (2**63))
        noise[:, i] = torch.randn(per_pos, generator=gen)
    return noise


gaussian_noise = renamed(add_noise, "gaussian_noise")
