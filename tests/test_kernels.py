"""The kernel choices in model.py: which products leave F.linear (generation's decode steps only),
and that they stay close to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hookedcot import model as model_module
from hookedcot.model import GEMV_MAX_ROWS, GEMV_MIN_WEIGHT, Linear, decode_kernels

needs_onednn = pytest.mark.skipif(model_module._ONEDNN_LINEAR is None, reason="torch built without oneDNN")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _layer(out_features: int = GEMV_MIN_WEIGHT // 64, in_features: int = 64, bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(in_features, out_features, bias=bias)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_decode_rows_use_onednn_and_stay_within_float_noise(two_threads, bias):
    layer = _layer(bias=bias)
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        assert not model_module._use_onednn_gemv(x, layer.weight)  # only generation's steps
    with torch.inference_mode(), decode_kernels():
        assert model_module._use_onednn_gemv(x, layer.weight)
        got, ref = layer(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


@needs_onednn
def test_prompts_gradients_and_one_thread_stay_on_f_linear(two_threads):
    layer = _layer()
    prompt = torch.randn(1, GEMV_MAX_ROWS + 1, 64)
    step = torch.randn(1, 1, 64)
    with torch.inference_mode(), decode_kernels():
        assert not model_module._use_onednn_gemv(prompt, layer.weight)
        assert torch.equal(layer(prompt), F.linear(prompt, layer.weight, layer.bias))
        assert not model_module._use_onednn_gemv(step.double(), layer.weight.double())
        small = _layer(out_features=GEMV_MIN_WEIGHT // 64 - 1)  # per-call overhead beats its read
        assert not model_module._use_onednn_gemv(step, small.weight)
    with decode_kernels():  # with autograd on, F.linear: oneDNN's op has no backward
        assert not model_module._use_onednn_gemv(step, layer.weight)
        out = layer(step.requires_grad_())
        out.sum().backward()
        assert step.grad is not None
    torch.set_num_threads(1)
    with torch.inference_mode(), decode_kernels():
        assert not model_module._use_onednn_gemv(step, layer.weight)


@needs_onednn
def test_linear_calls_onednn_exactly_when_the_rule_says(two_threads, monkeypatch):
    calls = []
    real = model_module._ONEDNN_LINEAR
    monkeypatch.setattr(model_module, "_ONEDNN_LINEAR", lambda *a: calls.append(1) or real(*a))
    layer, step = _layer(), torch.randn(1, 1, 64)
    with torch.inference_mode():
        layer(step)
        assert calls == []  # outside generate: F.linear
        with decode_kernels():
            layer(step)
            layer(torch.randn(1, GEMV_MAX_ROWS + 1, 64))
    assert calls == [1]
