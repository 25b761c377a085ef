"""The tiny model and the clean/corrupted pair the patching tests share (pytest finds the fixtures
where they are imported)."""

from __future__ import annotations

import pytest
import torch
from model_factory import random_model

from hookedcot import HookedCoT, ModelConfig

CFG = ModelConfig(n_layers=4, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128, d_vocab=300, qkv_bias=True)


def _model(noise: float) -> HookedCoT:
    return random_model(CFG, noise)


@pytest.fixture(scope="module")
def model() -> HookedCoT:
    return _model(0.3)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, CFG.d_vocab, (1, 14), generator=torch.Generator().manual_seed(3))
    corrupted = clean.clone()
    corrupted[0, 4], corrupted[0, 9] = 7, 8
    return clean, corrupted


def answer_logprob(model, clean):
    """log P(the clean run's top token) at the last position: a metric every row can be scored on."""
    target = int(model(clean)[0, -1].argmax())
    return lambda lg: lg[:, -1].float().log_softmax(-1)[:, target]
