"""CPU decode kernels, swapped into a model by generation (as gpt-fast's quantize.py swaps nn.Linear).

F.linear's matrix-vector product (MKL's sgemv) reads the weights from one thread whatever the
thread count; a decode step is a few such products per layer, so generation spreads them over
every thread with `split_linear`, which keeps F.linear's bits. Every other forward (sweeps, the
lens, a plain `model(tokens)`) runs plain F.linear.

`decode_kernels(model)` turns the model's Linear layers into `DecodeLinear` for the duration of
the block and back on exit, also when it raises. The swap is seen by every thread using the model,
so `DecodeLinear` only splits inside a `decode_kernels` block of its own thread (a ContextVar):
another thread's forward in the meantime still runs F.linear.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hookedcot.model import Linear

GEMV_MAX_ROWS = 4  # products of more rows (a prompt) are matrix products F.linear already spreads
GEMV_MIN_WEIGHT = 1 << 17  # elements: below it the split's own ops cost more than it saves
GEMV_SPLITS = (8, 4, 2)  # row blocks tried, most first; at most 2 per thread
GEMV_BLOCK_MULTIPLE = 16  # rows per block: other block sizes can change the bits at high thread counts

_DECODING: ContextVar[bool] = ContextVar("hookedcot_decoding", default=False)
_LOCK = threading.Lock()
_SWAPPED: dict[int, tuple[int, list[tuple[nn.Linear, type]]]] = {}  # id(model) -> (users, swapped layers)


def gemv_splits(x: Tensor, weight: Tensor) -> int:
    """Row blocks to cut `weight` into for the product x @ weight.T; 0 means plain F.linear."""
    if weight.numel() < GEMV_MIN_WEIGHT:  # the cheap test first: this runs for every product
        return 0
    threads = torch.get_num_threads()
    if not (
        threads > 1
        and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
    ):
        return 0
    n_out = weight.shape[0]
    fits = (n for n in GEMV_SPLITS if n <= 2 * threads and n_out % (n * GEMV_BLOCK_MULTIPLE) == 0)
    return next(fits, 0)


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None, splits: int) -> Tensor:
    """F.linear as one batched product over `splits` row blocks of the weight, which torch's bmm
    spreads over its threads. Each output is still one dot product by the same kernel, so the
    result equals F.linear's bit for bit when the blocks are whole multiples of 16 rows, as
    `gemv_splits` picks them."""
    n_out, d = weight.shape
    rows = x.reshape(1, -1, d).expand(splits, -1, d)
    blocks = weight.view(splits, n_out // splits, d).transpose(1, 2)
    if bias is None:
        y = torch.bmm(rows, blocks)
    else:
        y = torch.baddbmm(bias.view(splits, 1, n_out // splits), rows, blocks)
    return y.transpose(0, 1).reshape(*x.shape[:-1], n_out)


class DecodeLinear(nn.Linear):
    """A Linear layer inside `decode_kernels`: decode-step products of this thread's block run as
    `split_linear`, everything else as F.linear."""

    def forward(self, x: Tensor) -> Tensor:
        splits = gemv_splits(x, self.weight) if _DECODING.get() else 0
        if splits:
            return split_linear(x, self.weight, self.bias, splits)
        return F.linear(x, self.weight, self.bias)


@contextmanager
def decode_kernels(model: nn.Module) -> Iterator[None]:
    """Within: `model`'s float32 CPU Linear layers are DecodeLinear, and this thread's decode-step
    products split over the CPU's threads. Nested and concurrent blocks on one model share one
    swap; the last to leave swaps the layers back."""
    _swap_in(model)
    token = _DECODING.set(True)
    try:
        yield
    finally:
        _DECODING.reset(token)
        _swap_out(model)


def _swap_in(model: nn.Module) -> None:
    # The layer keeps its identity, parameters and torch hooks; only its class (its forward) changes.
    with _LOCK:
        users, layers = _SWAPPED.get(id(model), (0, []))
        if users == 0:
            layers = [(m, type(m)) for m in model.modules() if _splittable(m)]
            try:
                for layer, _ in layers:
                    layer.__class__ = DecodeLinear
            except BaseException:  # nothing half-swapped stays behind
                for layer, cls in layers:
                    layer.__class__ = cls
                raise
        _SWAPPED[id(model)] = (users + 1, layers)


def _splittable(module: nn.Module) -> bool:
    # Exactly the plain layers, whose forward is F.linear: a user's subclass or a parametrized
    # layer computes something else. A GPU or half-precision layer would only pay the checks.
    return (
        type(module) in (Linear, nn.Linear)
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    )


def _swap_out(model: nn.Module) -> None:
    with _LOCK:
        users, layers = _SWAPPED.pop(id(model))
        if users > 1:
            _SWAPPED[id(model)] = (users - 1, layers)
            return
        for layer, cls in layers:
            layer.__class__ = cls
