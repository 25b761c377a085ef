"""The kernel choice in model.py: which products leave F.linear (generation's decode steps only),
and that they give F.linear's bits exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hookedcot import model as model_module
from hookedcot.model import GEMV_MAX_ROWS, GEMV_MIN_WEIGHT, Linear, decode_kernels, gemv_splits, split_linear

# (out, in) of the real models' products: SmolLM2, Qwen2-0.5B, Llama-3.2-1B
REAL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (896, 896), (128, 896), (4864, 896),
               (896, 4864), (2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]
UNEMBEDDINGS = [(49152, 576), (151936, 896), (128256, 2048)]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _layer(out_features: int = GEMV_MIN_WEIGHT // 64, in_features: int = 64, bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(in_features, out_features, bias=bias)


THREADS = (2, 3, 4, 8, 16)


@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_split_products_equal_f_linear_bit_for_bit(shape):
    """At every thread count, through Linear itself: the split the rule picks keeps F.linear's bits."""
    gen = torch.Generator().manual_seed(sum(shape))
    layer = Linear(shape[1], shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape, generator=gen) * 0.05)
        layer.bias.copy_(torch.randn(shape[0], generator=gen))
    before = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            with torch.inference_mode(), decode_kernels():
                chosen = gemv_splits(torch.zeros(1, shape[1]), layer.weight)
                assert (chosen > 0) == (layer.weight.numel() >= GEMV_MIN_WEIGHT), threads
                splits = chosen or 2  # k / v weights stay on F.linear; their split is checked anyway
                for rows in range(1, GEMV_MAX_ROWS + 1):
                    x = torch.randn(rows, 1, shape[1], generator=gen)
                    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)), (threads, rows)
                    assert torch.equal(split_linear(x, layer.weight, layer.bias, splits),
                                       F.linear(x, layer.weight, layer.bias)), (threads, rows, splits)
                    assert torch.equal(split_linear(x, layer.weight, None, splits),
                                       F.linear(x, layer.weight)), (threads, rows, splits, "no bias")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", UNEMBEDDINGS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_split_unembeddings_equal_f_linear_bit_for_bit(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    x = torch.randn(GEMV_MAX_ROWS, shape[1], generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        with torch.inference_mode(), decode_kernels():
            for threads in THREADS:
                torch.set_num_threads(threads)
                splits = gemv_splits(x, weight)
                assert splits > 0
                for rows in (1, GEMV_MAX_ROWS):
                    assert torch.equal(split_linear(x[:rows], weight, None, splits), F.linear(x[:rows], weight)), (threads, rows)
    finally:
        torch.set_num_threads(before)


def test_blocks_are_whole_multiples_of_sixteen_rows(two_threads):
    with torch.inference_mode(), decode_kernels():
        torch.set_num_threads(16)
        assert gemv_splits(torch.zeros(1, 576), torch.zeros(576, 576)) == 4  # 8 blocks of 72 rows would not be whole multiples of 16
        assert gemv_splits(torch.zeros(1, 576), torch.zeros(1536, 576)) == 8
        assert gemv_splits(torch.zeros(1, 64), torch.zeros(2056, 64)) == 0  # 2056 rows: no block count fits


def test_decode_rows_split_and_keep_the_bits(two_threads):
    layer = _layer()
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        assert gemv_splits(x, layer.weight) == 0  # only generation's steps
    with torch.inference_mode(), decode_kernels():
        assert gemv_splits(x, layer.weight) == 4  # two blocks per thread, 512 rows each
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_prompts_gradients_small_weights_and_one_thread_stay_on_f_linear(two_threads):
    layer = _layer()
    prompt = torch.randn(1, GEMV_MAX_ROWS + 1, 64)
    step = torch.randn(1, 1, 64)
    with torch.inference_mode(), decode_kernels():
        assert gemv_splits(prompt, layer.weight) == 0
        assert gemv_splits(step.double(), layer.weight.double()) == 0
        assert gemv_splits(step, _layer(out_features=GEMV_MIN_WEIGHT // 64 - 2).weight) == 0  # too small to pay
        assert gemv_splits(step, _layer(out_features=GEMV_MIN_WEIGHT // 64 + 8).weight) == 0  # no whole 16-row blocks
        assert gemv_splits(step, layer.weight.t().contiguous().t()) == 0  # not contiguous
    with decode_kernels():  # with autograd on, F.linear
        assert gemv_splits(step, layer.weight) == 0
        out = layer(step.requires_grad_())
        out.sum().backward()
        assert step.grad is not None
    torch.set_num_threads(1)
    with torch.inference_mode(), decode_kernels():
        assert gemv_splits(step, layer.weight) == 0


def test_linear_splits_exactly_when_the_rule_says(two_threads, monkeypatch):
    calls = []
    real = model_module.split_linear
    monkeypatch.setattr(model_module, "split_linear", lambda *a: calls.append(1) or real(*a))
    layer, step = _layer(), torch.randn(1, 1, 64)
    with torch.inference_mode():
        layer(step)
        assert calls == []  # outside generate: F.linear
        with decode_kernels():
            layer(step)
            layer(torch.randn(1, GEMV_MAX_ROWS + 1, 64))
    assert calls == [1]
