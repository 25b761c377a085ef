"""Random-weight HookedCoT models for tests that need no checkpoint on disk."""

from __future__ import annotations

from typing import Any

import torch

from hookedcot import HookedCoT, ModelConfig


def random_model(cfg: ModelConfig, noise: float = 0.3, seed: int = 0, tokenizer: Any = None) -> HookedCoT:
    """A model with default init plus N(0, noise²) on every parameter (norm weights and biases
    included, so a missing weight multiply or bias cannot hide)."""
    torch.manual_seed(seed)
    model = HookedCoT(cfg, tokenizer=tokenizer).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model
