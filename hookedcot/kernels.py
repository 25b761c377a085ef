"""The matrix products of the model's Linear layers: which kernel computes x @ W.T.

F.linear's matrix-vector product (MKL's sgemv) reads the weights from one thread whatever the
thread count; a decode step is a few such products per layer. So a float32 CPU product of at most
`GEMV_MAX_ROWS` token rows, without autograd, runs as `split_linear`, which spreads the weight's
row blocks over every thread and keeps F.linear's bits exactly; while a decode step is being
compiled it runs as `gemv_by_reduction`, which inductor turns into one loop near the memory
bandwidth. Everything else is plain F.linear.

The choice depends on the call's arguments only (no mode, no swapped classes, no state): a
forward of any thread, interrupted anywhere, leaves nothing behind.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

GEMV_MAX_ROWS = 4  # products of more rows (a prompt) are matrix products F.linear already spreads
GEMV_MIN_WEIGHT = 1 << 17  # elements: below it the split's own ops cost more than it saves
GEMV_SPLITS = (8, 4, 2)  # row blocks tried, most first; at most 2 per thread
GEMV_BLOCK_MULTIPLE = 16  # rows per block: other block sizes can change the bits at high thread counts


def gemv_splits(x: Tensor, weight: Tensor) -> int:
    """Row blocks to cut `weight` into for the product x @ weight.T; 0 means plain F.linear."""
    if weight.numel() < GEMV_MIN_WEIGHT or not x.is_cpu:  # the cheap tests first: this runs for every product
        return 0
    threads = torch.get_num_threads()
    if not (
        threads > 1
        and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]
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


def gemv_by_reduction(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T written as multiply-and-sum, for a step being compiled: inductor turns it into
    one vectorised loop over the weight's rows, spread over the threads, which reads the weight
    near the memory bandwidth (measured 2026-11-30 on the 2-core EPYC, float32: 36–48 GB/s against
    16 GB/s for MKL's one-threaded sgemv and 26–30 GB/s for `split_linear`). Run eagerly it would
    materialise rows × weight; it is only ever traced. The sum runs in another order than sgemv's,
    so the bits differ (by float32 rounding: the compiled step's tolerance, tests/test_fast_decode)."""
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y + bias if bias is not None else y


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias by the kernel this call's shapes want (module docstring)."""
    # True only inside a graph dynamo traces (is_compiling() is one process-wide flag that other
    # threads would see during a compile, and run the reduction eagerly: rows × weight in memory)
    if torch.compiler.is_dynamo_compiling():
        if x.numel() <= GEMV_MAX_ROWS * x.shape[-1] and x.device.type == "cpu" and weight.dtype == torch.float32:
            return gemv_by_reduction(x, weight, bias)
        return F.linear(x, weight, bias)
    splits = gemv_splits(x, weight)
    if splits:
        return split_linear(x, weight, bias, splits)
    return F.linear(x, weight, bias)


@contextmanager
def decode_kernels(model: torch.nn.Module) -> Iterator[None]:
    """Deprecated: a no-op. Linear layers now pick their kernel on every call; nothing is swapped."""
    warnings.warn("hookedcot.kernels.decode_kernels is no longer needed (Linear picks its kernel per call) and "
                  "does nothing; remove it. It goes in the next release.", DeprecationWarning, stacklevel=3)
    yield
