"""The Linear layers' kernels (kernels.py): which products leave F.linear (at most 4 token rows,
float32 CPU, no autograd), that they give F.linear's bits exactly in every thread, and the
reduction a compiled step uses."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from model_factory import random_model

from hookedcot import ModelConfig
from hookedcot import kernels
from hookedcot.kernels import GEMV_MAX_ROWS, GEMV_MIN_WEIGHT, gemv_by_reduction, gemv_splits, split_linear
from hookedcot.model import Linear

# (out, in) of the real models' products: SmolLM2, Qwen2-0.5B, Llama-3.2-1B
REAL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (896, 896), (128, 896), (4864, 896),
               (896, 4864), (2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]
UNEMBEDDINGS = [(49152, 576), (151936, 896), (128256, 2048)]
THREADS = (2, 3, 4, 8, 16)
# d_mlp 2048 x d_model 64: the MLP's weights are big enough to split, the attention's are not
CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=2048, d_vocab=97)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def split_calls(monkeypatch):
    calls: list[int] = []
    real = kernels.split_linear
    monkeypatch.setattr(kernels, "split_linear", lambda *a: calls.append(1) or real(*a))
    return calls


def _layer(out_features: int = GEMV_MIN_WEIGHT // 64, in_features: int = 64, bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_split_products_equal_f_linear_bit_for_bit(shape):
    """At every thread count, through the layer itself: the split the rule picks keeps F.linear's bits."""
    gen = torch.Generator().manual_seed(sum(shape))
    layer = Linear(shape[1], shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape, generator=gen) * 0.05)
        layer.bias.copy_(torch.randn(shape[0], generator=gen))
    before = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            with torch.inference_mode():
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
        with torch.inference_mode():
            for threads in THREADS:
                torch.set_num_threads(threads)
                splits = gemv_splits(x, weight)
                assert splits > 0
                for rows in (1, GEMV_MAX_ROWS):
                    assert torch.equal(split_linear(x[:rows], weight, None, splits), F.linear(x[:rows], weight)), (threads, rows)
    finally:
        torch.set_num_threads(before)


def test_blocks_are_whole_multiples_of_sixteen_rows(two_threads):
    with torch.inference_mode():
        torch.set_num_threads(16)
        assert gemv_splits(torch.zeros(1, 576), torch.zeros(576, 576)) == 4  # 8 blocks of 72 rows would not be whole multiples of 16
        assert gemv_splits(torch.zeros(1, 576), torch.zeros(1536, 576)) == 8
        assert gemv_splits(torch.zeros(1, 64), torch.zeros(2056, 64)) == 0  # 2056 rows: no block count fits


def test_decode_rows_split_and_keep_the_bits(two_threads, split_calls):
    layer = _layer()
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        assert gemv_splits(x, layer.weight) == 4  # two blocks per thread, 512 rows each
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert split_calls == [1]


def test_prompts_gradients_small_weights_and_one_thread_stay_on_f_linear(two_threads, split_calls):
    layer = _layer()
    prompt = torch.randn(1, GEMV_MAX_ROWS + 1, 64)
    step = torch.randn(1, 1, 64)
    with torch.inference_mode():
        assert gemv_splits(prompt, layer.weight) == 0
        assert gemv_splits(step.double(), layer.weight.double()) == 0
        assert gemv_splits(step, _layer(out_features=GEMV_MIN_WEIGHT // 64 - 2).weight) == 0  # too small to pay
        assert gemv_splits(step, _layer(out_features=GEMV_MIN_WEIGHT // 64 + 8).weight) == 0  # no whole 16-row blocks
        assert gemv_splits(step, layer.weight.t().contiguous().t()) == 0  # not contiguous
        layer(prompt)
    assert gemv_splits(step, layer.weight) == 0  # with autograd on, F.linear
    out = layer(step.requires_grad_())
    out.sum().backward()
    assert step.grad is not None and split_calls == []
    torch.set_num_threads(1)
    with torch.inference_mode():
        assert gemv_splits(step, layer.weight) == 0


def test_every_thread_splits_its_own_products_with_f_linears_bits(two_threads, split_calls):
    """No mode and no shared state: a forward in any thread, during another's generation or not,
    picks its kernel from its own arguments and gets F.linear's bits."""
    layer, step = _layer(), torch.randn(1, 1, 64)
    seen: list[bool] = []

    def other_thread():
        with torch.inference_mode():
            seen.append(torch.equal(layer(step), F.linear(step, layer.weight, layer.bias)))

    workers = [threading.Thread(target=other_thread) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert seen == [True] * 4 and len(split_calls) == 4


def test_generation_splits_its_decode_products_and_leaves_the_model_as_it_was(two_threads, split_calls):
    model = random_model(CFG)
    linears = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tokens = torch.randint(0, CFG.d_vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    model.generate(tokens, max_new_tokens=3, stop_at_eos=False)
    assert split_calls  # the MLP's decode-step products
    assert {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == linears


def test_half_precision_layers_keep_plain_f_linear(split_calls):
    layer = _layer().to(torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert split_calls == []


def test_user_subclasses_and_parametrized_layers_keep_their_own_forward(two_threads):
    """A parametrized weight is split as it is computed; a subclass with its own forward keeps it."""

    class Doubled(Linear):
        def forward(self, x):
            return 2 * F.linear(x, self.weight, self.bias)

    class Same(torch.nn.Module):
        def forward(self, w):
            return w

    model = random_model(CFG)
    tokens = torch.randint(0, CFG.d_vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = model.generate(tokens, max_new_tokens=3, stop_at_eos=False)
    torch.nn.utils.parametrize.register_parametrization(model.blocks[0].mlp.up_proj, "weight", Same())
    assert torch.equal(model.generate(tokens, max_new_tokens=3, stop_at_eos=False), plain)
    doubled = Doubled(64, GEMV_MIN_WEIGHT // 64)
    step = torch.randn(1, 1, 64)
    with torch.inference_mode():
        assert torch.equal(doubled(step), 2 * F.linear(step, doubled.weight, doubled.bias))


def test_the_compiled_steps_reduction_is_the_product_up_to_float32_rounding():
    """Run eagerly here (small shapes) against float64 F.linear: within float32 rounding of a
    576-term dot product; bits may differ from sgemv's (another summation order)."""
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(2, 1, 576, generator=gen), torch.randn(192, 576, generator=gen) * 0.05, torch.randn(192, generator=gen)
    exact = F.linear(x.double(), w.double(), b.double())
    for bias in (b, None):
        got = gemv_by_reduction(x, w, bias).double()
        want = exact if bias is not None else exact - b.double()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
