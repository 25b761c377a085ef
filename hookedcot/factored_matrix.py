"""A matrix kept as the product of two factors, A @ B, with TransformerLens' FactoredMatrix methods.

A head's OV circuit W_V @ W_O is [d_model, d_model] of rank d_head; W_E @ OV @ W_U is
[d_vocab, d_vocab] (152k² for Qwen2) and would not fit in memory. Kept factored, products, the SVD,
the eigenvalues and the norm cost O(d · d_head²). Leading dimensions (layers, heads) broadcast,
and indexing a FactoredMatrix indexes them: `model.OV[layer, head]`.

The semantics are TransformerLens' (so its notebooks run unchanged), including two of its habits:
`svd()` returns (U, S, V) with `M == U @ diag(S) @ V^T` (V, not V^H), and `Vh` is the same V
(TL's historical name, with TL's DeprecationWarning). `eigenvalues` are those of the smaller
B @ A (AB's others are zero). Shape errors are `FactoredShapeError`, a ValueError that is also the
AssertionError / RuntimeError TransformerLens raised, so code that catches those still does.

    >>> m = FactoredMatrix(torch.randn(5, 2), torch.randn(2, 5))
    >>> torch.allclose(m.AB, m.A @ m.B), m.shape, m.S.shape
    (True, torch.Size([5, 5]), torch.Size([2]))
"""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import Union

import torch
from jaxtyping import Complex, Float
from torch import Tensor

from hookedcot.errors import HookedCoTError


class FactoredShapeError(HookedCoTError, ValueError, AssertionError, RuntimeError):
    """Factors or operands whose shapes do not fit (TL raised AssertionError or RuntimeError)."""


class FactoredMatrix:
    def __init__(self, A: Float[Tensor, "... ldim mdim"], B: Float[Tensor, "... mdim rdim"]):
        if A.shape[-1] != B.shape[-2]:
            raise FactoredShapeError(f"FactoredMatrix factors must share their inner dimension: A is {tuple(A.shape)}, "
                             f"B is {tuple(B.shape)} (A's last dimension must equal B's second-to-last)")
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as e:
            raise FactoredShapeError("Shape mismatch: FactoredMatrix factors' leading dimensions do not broadcast: "
                                     f"A is {tuple(A.shape)}, B is {tuple(B.shape)}") from e
        self.shape = torch.Size(lead + (self.ldim, self.rdim))
        self.A = A.broadcast_to(lead + (self.ldim, self.mdim))
        self.B = B.broadcast_to(lead + (self.mdim, self.rdim))
        self.has_leading_dims = len(lead) > 0

    # ----------------------------------------------------------------- products
    def __matmul__(self, other: Union[Tensor, "FactoredMatrix"]) -> Union["FactoredMatrix", Tensor]:
        """self @ other: a FactoredMatrix, or a tensor for a vector (the factorisation collapses)."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim < 2:
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise FactoredShapeError(f"cannot multiply a FactoredMatrix of shape {tuple(self.shape)} by a tensor of shape "
                             f"{tuple(other.shape)}: inner dimensions {self.rdim} and {other.shape[-2]} differ")
        # keep the inner dimension as small as possible (TL's rule)
        return FactoredMatrix(self.A, self.B @ other) if self.rdim > self.mdim else FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor) -> Union["FactoredMatrix", Tensor]:
        """other @ self."""
        if other.shape[-1] != self.ldim:
            raise FactoredShapeError(f"cannot multiply a tensor of shape {tuple(other.shape)} by a FactoredMatrix of shape "
                             f"{tuple(self.shape)}: inner dimensions {other.shape[-1]} and {self.ldim} differ")
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        return FactoredMatrix(other @ self.A, self.B) if self.ldim > self.mdim else FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Union[int, float, Tensor]) -> "FactoredMatrix":
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise FactoredShapeError(f"`*` scales by a scalar; got a tensor of shape {tuple(scalar.shape)} (use @ for products)")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    @property
    def AB(self) -> Float[Tensor, "... ldim rdim"]:
        """The product, materialised (can be large: [d_vocab, d_vocab] for a full circuit)."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... mdim mdim"]:
        """The reverse product B @ A (square matrices only)."""
        if self.ldim != self.rdim:
            raise FactoredShapeError(f"BA needs a square FactoredMatrix; this one is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        return self.A, self.B

    # ------------------------------------------------------------ decompositions
    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        # SVD of each factor, then of the small mdim x mdim middle: never forms AB.
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = Sa[..., :, None] * Vha @ Ub * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, Vhb.transpose(-2, -1) @ Vhm.transpose(-2, -1)

    def svd(self) -> tuple[Float[Tensor, "... ldim mdim"], Float[Tensor, "... mdim"], Float[Tensor, "... rdim mdim"]]:
        """(U, S, V) with AB == U @ diag(S) @ V^T; S descending, mdim of them (computed once)."""
        return self._svd

    @property
    def U(self) -> Float[Tensor, "... ldim mdim"]:
        return self._svd[0]

    @property
    def S(self) -> Float[Tensor, "... mdim"]:
        return self._svd[1]

    @property
    def V(self) -> Float[Tensor, "... rdim mdim"]:
        return self._svd[2]

    @property
    def Vh(self) -> Float[Tensor, "... rdim mdim"]:
        """V, as TransformerLens' `Vh` has always been (not V^H): AB == U @ diag(S) @ Vh^T."""
        warnings.warn("FactoredMatrix.Vh is V (the right singular vectors), not V^H, as in TransformerLens; "
                      "use .V", DeprecationWarning, stacklevel=2)
        return self._svd[2]

    @property
    def eigenvalues(self) -> Complex[Tensor, "... mdim"]:
        """The eigenvalues of BA, which are AB's non-zero ones (BAv = kv gives AB(Av) = k(Av))."""
        ba = self.BA
        return torch.linalg.eigvals(ba.float() if ba.dtype in (torch.float16, torch.bfloat16) else ba)

    def norm(self) -> Float[Tensor, "..."]:
        """Frobenius norm: sqrt of the sum of squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> "FactoredMatrix":
        """The same matrix factored as (U sqrt(S), sqrt(S) V^T): each half holds half the scale."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.transpose(-2, -1))

    def collapse_l(self) -> Float[Tensor, "... mdim rdim"]:
        """diag(S) @ V^T: the matrix with its left orthogonal factor U dropped."""
        return self.S[..., :, None] * self.V.transpose(-2, -1)

    def collapse_r(self) -> Float[Tensor, "... ldim mdim"]:
        """U @ diag(S): the matrix with its right orthogonal factor V dropped."""
        return self.U * self.S[..., None, :]

    # ----------------------------------------------------------------- indexing
    def __getitem__(self, idx) -> "FactoredMatrix":
        """Indexes the leading dimensions; an index one or two longer also indexes rows (and
        columns), keeping them as size-1 dimensions so the result stays a matrix (TL's rule)."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        length = len([i for i in idx if i is not None])
        n_lead = len(self.shape) - 2
        if length <= n_lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if length == n_lead + 1:
            idx = _keep_dim(idx, -1)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if length == n_lead + 2:
            idx = _keep_dim(_keep_dim(idx, -1), -2)
            return FactoredMatrix(self.A[idx[:-1]], self.B[idx[:-2] + (slice(None), idx[-1])])
        raise IndexError(f"index {idx} is too long for a FactoredMatrix of shape {tuple(self.shape)}")

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def get_corner(self, k: int = 3) -> Tensor:
        """The top-left k x k corner of AB (and the first k of each leading dimension)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"


def _keep_dim(idx: tuple, at: int) -> tuple:
    """An int index at `at` turned into a length-1 slice, so indexing keeps that dimension."""
    idx = list(idx)
    if isinstance(idx[at], int):
        value = idx[at]
        idx[at] = slice(value, value + 1 if value != -1 else None)
    return tuple(idx)
