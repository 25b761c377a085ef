"""Weights under TransformerLens' names and shapes, as views of the checkpoint's own tensors.

TransformerLens stores a head's weights as [head, d_model, d_head] and multiplies on the right
(`x @ W_Q`); transformers (and hookedcot) keep `nn.Linear` weights [out, in]. Nothing here is
stored: every name is a property that reshapes the loaded tensor on access (a view where one
exists; the stacks over layers and GQA's repeated keys/values are computed, as in TransformerLens),
so the model holds one copy of its weights and the views follow any in-place edit. Biases the
architecture lacks read as zeros (LLaMA has none; Qwen2 has q/k/v biases only).

| name | shape | from |
|---|---|---|
| `attn.W_Q` | [n_heads, d_model, d_head] | `q_proj.weight` |
| `attn._W_K`, `attn._W_V` | [n_key_value_heads, d_model, d_head] | `k_proj` / `v_proj` (GQA's own heads) |
| `attn.W_K`, `attn.W_V` | [n_heads, d_model, d_head] | the above repeated per query head (TL's GQA) |
| `attn.W_O` | [n_heads, d_head, d_model] | `o_proj.weight` |
| `attn.b_Q` / `b_K` / `b_V` (`_b_K`, `_b_V`) | [heads, d_head] | the projection's bias, or zeros |
| `attn.b_O` | [d_model] | `o_proj.bias`, or zeros |
| `attn.QK`, `attn.OV` | FactoredMatrix [n_heads, d_model, d_model] | W_Q @ W_K^T, W_V @ W_O |
| `mlp.W_in`, `mlp.W_gate` | [d_model, d_mlp] | `up_proj`, `gate_proj` (TL's GatedMLP) |
| `mlp.W_out` | [d_mlp, d_model] | `down_proj` |
| `mlp.b_in`, `mlp.b_gate`, `mlp.b_out` | [d_mlp], [d_mlp], [d_model] | biases, or zeros |
| `model.W_Q` ... `model.b_out` | [n_layers, ...] | the per-block names stacked |
| `model.W_E`, `embed.W_E` | [d_vocab, d_model] | the embedding |
| `model.W_U`, `unembed.W_U` | [d_model, d_vocab] | the unembedding, transposed |
| `model.b_U`, `unembed.b_U` | [d_vocab] | zeros (no unembedding bias in these families) |

Example (TL's OV-circuit recipe, unchanged):

    ov = model.OV[1, 3]                   # layer 1, head 3: FactoredMatrix [d_model, d_model]
    full = model.W_E @ ov @ model.W_U     # FactoredMatrix [d_vocab, d_vocab], never materialised
    full.eigenvalues                      # its d_head non-trivial eigenvalues (complex)
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hookedcot.factored_matrix import FactoredMatrix


def _bias(linear: nn.Linear, *shape: int) -> Tensor:
    """The layer's bias viewed as `shape`, or zeros of that shape where the layer has none."""
    if linear.bias is not None:
        return linear.bias.view(*shape)
    return torch.zeros(*shape, dtype=linear.weight.dtype, device=linear.weight.device)


def _heads_in(linear: nn.Linear, n_heads: int) -> Tensor:
    """A [heads * d_head, d_model] projection as TL's [heads, d_model, d_head] (a view)."""
    return linear.weight.view(n_heads, -1, linear.weight.shape[1]).transpose(1, 2)


class AttentionWeights:
    """TransformerLens' per-head weight names on an attention module (see the module's table).
    Expects `q_proj`, `k_proj`, `v_proj`, `o_proj`, `n_heads`, `n_kv_heads`, `d_head`."""

    @property
    def W_Q(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return _heads_in(self.q_proj, self.n_heads)

    @property
    def _W_K(self) -> Float[Tensor, "n_key_value_heads d_model d_head"]:
        return _heads_in(self.k_proj, self.n_kv_heads)

    @property
    def _W_V(self) -> Float[Tensor, "n_key_value_heads d_model d_head"]:
        return _heads_in(self.v_proj, self.n_kv_heads)

    @property
    def W_K(self) -> Float[Tensor, "n_heads d_model d_head"]:
        """Keys per query head: each key/value head repeated for the query heads that share it."""
        return self._per_query_head(self._W_K)

    @property
    def W_V(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._per_query_head(self._W_V)

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        w = self.o_proj.weight  # d_model, n_heads * d_head
        return w.view(w.shape[0], self.n_heads, self.d_head).permute(1, 2, 0)

    @property
    def b_Q(self) -> Float[Tensor, "n_heads d_head"]:
        return _bias(self.q_proj, self.n_heads, self.d_head)

    @property
    def _b_K(self) -> Float[Tensor, "n_key_value_heads d_head"]:
        return _bias(self.k_proj, self.n_kv_heads, self.d_head)

    @property
    def _b_V(self) -> Float[Tensor, "n_key_value_heads d_head"]:
        return _bias(self.v_proj, self.n_kv_heads, self.d_head)

    @property
    def b_K(self) -> Float[Tensor, "n_heads d_head"]:
        return self._per_query_head(self._b_K)

    @property
    def b_V(self) -> Float[Tensor, "n_heads d_head"]:
        return self._per_query_head(self._b_V)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        return _bias(self.o_proj, self.o_proj.weight.shape[0])

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T per head, [n_heads, d_model, d_model] factored: scores = x_dest @ QK @ x_src^T
        (before rotary embedding, which TL's QK also leaves out, and before the 1/sqrt(d_head))."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O per head, [n_heads, d_model, d_model] factored: a head's output = pattern @ x @ OV."""
        return FactoredMatrix(self.W_V, self.W_O)

    def _per_query_head(self, t: Tensor) -> Tensor:
        rep = self.n_heads // self.n_kv_heads
        return t if rep == 1 else t.repeat_interleave(rep, dim=0)


class MLPWeights:
    """TransformerLens' GatedMLP names on a SwiGLU module: out = (silu(x @ W_gate) * (x @ W_in)) @ W_out."""

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.up_proj.weight.T

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_proj.weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.weight.T

    @property
    def b_in(self) -> Float[Tensor, "d_mlp"]:
        return _bias(self.up_proj, self.up_proj.weight.shape[0])

    @property
    def b_gate(self) -> Float[Tensor, "d_mlp"]:
        """Not in TransformerLens (its GatedMLP has no gate bias); here for LLaMA's mlp_bias."""
        return _bias(self.gate_proj, self.gate_proj.weight.shape[0])

    @property
    def b_out(self) -> Float[Tensor, "d_model"]:
        return _bias(self.down_proj, self.down_proj.weight.shape[0])


MLP_NAMES = ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out")


def _stacked(name: str, doc: str) -> property:
    """A model-level property: the blocks' `attn.<name>` or `mlp.<name>` stacked over layers
    (computed on access, as TransformerLens' are; index a block's own for one layer without the copy)."""
    part = "mlp" if name in MLP_NAMES else "attn"

    def get(self) -> Tensor:
        return torch.stack([getattr(getattr(block, part), name) for block in self.blocks])

    get.__name__, get.__doc__ = name, doc
    return property(get)


class ModelWeights:
    """TransformerLens' model-level weight names (see the module's table). Expects `blocks`,
    `embed`, `unembed`."""

    W_Q = _stacked("W_Q", "[n_layers, n_heads, d_model, d_head]")
    W_K = _stacked("W_K", "[n_layers, n_heads, d_model, d_head] (GQA: repeated per query head, as TL)")
    W_V = _stacked("W_V", "[n_layers, n_heads, d_model, d_head] (GQA: repeated per query head, as TL)")
    _W_K = _stacked("_W_K", "[n_layers, n_key_value_heads, d_model, d_head]")
    _W_V = _stacked("_W_V", "[n_layers, n_key_value_heads, d_model, d_head]")
    W_O = _stacked("W_O", "[n_layers, n_heads, d_head, d_model]")
    b_Q = _stacked("b_Q", "[n_layers, n_heads, d_head]")
    b_K = _stacked("b_K", "[n_layers, n_heads, d_head]")
    b_V = _stacked("b_V", "[n_layers, n_heads, d_head]")
    _b_K = _stacked("_b_K", "[n_layers, n_key_value_heads, d_head]")
    _b_V = _stacked("_b_V", "[n_layers, n_key_value_heads, d_head]")
    b_O = _stacked("b_O", "[n_layers, d_model]")
    W_in = _stacked("W_in", "[n_layers, d_model, d_mlp] (up_proj)")
    W_gate = _stacked("W_gate", "[n_layers, d_model, d_mlp] (gate_proj)")
    W_out = _stacked("W_out", "[n_layers, d_mlp, d_model] (down_proj)")
    b_in = _stacked("b_in", "[n_layers, d_mlp]")
    b_gate = _stacked("b_gate", "[n_layers, d_mlp]")
    b_out = _stacked("b_out", "[n_layers, d_model]")

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """A transposed view of the unembedding (tied models: of the embedding)."""
        return self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return _bias(self.unembed, self.unembed.weight.shape[0])

    @property
    def QK(self) -> FactoredMatrix:
        """[n_layers, n_heads, d_model, d_model] factored (`model.QK[layer, head]` for one head)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """[n_layers, n_heads, d_model, d_model] factored (`model.OV[layer, head]` for one head)."""
        return FactoredMatrix(self.W_V, self.W_O)
