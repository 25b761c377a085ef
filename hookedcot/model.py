"""The transformer: RMSNorm, rotary attention with GQA, SwiGLU MLP, blocks, and the forward pass.

One file that reads top to bottom. Every hook point of the contract (hook_names.py) is a call
`run(name, x)`, which is a dict lookup and nothing more when no hook listens there. Attention runs
the fused `scaled_dot_product_attention` unless a hook or the cache asks for the scores or the
pattern; then the explicit path builds them. Architecture differences are config fields.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hookedcot.config import ModelConfig
from hookedcot.hook_points import HookRun
from hookedcot.kv_cache import KVCache
from hookedcot.rope import apply_rotary, inv_freq, rotary_tables


GEMV_MAX_ROWS = 4
GEMV_MIN_WEIGHT = 1 << 17  # elements (512 KiB in float32): below it the split's own ops cost more than it saves
GEMV_SPLITS = (8, 4, 2)  # row blocks tried, most first; at most 2 per thread
GEMV_BLOCK_MULTIPLE = 16  # rows per block: blocks of 9, 14 or 18 rows change the bits (seen at 16 and 32 threads)
_DECODING: ContextVar[bool] = ContextVar("hookedcot_decoding", default=False)


@contextmanager
def decode_kernels() -> Iterator[None]:
    """Within (generate runs its prefill, steps, hooks and callbacks here): products of at most
    GEMV_MAX_ROWS rows with weights of GEMV_MIN_WEIGHT elements or more run as `split_linear` on a
    multi-threaded CPU in float32.

    Why: F.linear's matrix-vector product (MKL's sgemv) streams the weights from one thread, about
    12 GB/s here, whatever the thread count; the split reads them with every thread (SmolLM2's
    gate / up products: 294 → 179 µs, cold, 2 threads). The bits are F.linear's (tested)."""
    token = _DECODING.set(True)
    try:
        yield
    finally:
        _DECODING.reset(token)


def gemv_splits(x: Tensor, weight: Tensor) -> int:
    """Row blocks to cut `weight` into for this product (see decode_kernels); 0: plain F.linear."""
    if not _DECODING.get() or weight.numel() < GEMV_MIN_WEIGHT:  # the cheap tests first: this runs per product
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
    `gemv_splits` picks them (tests/test_kernels.py checks the real shapes at 2–16 threads)."""
    n_out, d = weight.shape
    rows = x.reshape(1, -1, d).expand(splits, -1, d)
    blocks = weight.view(splits, n_out // splits, d).transpose(1, 2)
    if bias is None:
        y = torch.bmm(rows, blocks)
    else:
        y = torch.baddbmm(bias.view(splits, 1, n_out // splits), rows, blocks)
    return y.transpose(0, 1).reshape(*x.shape[:-1], n_out)


class Linear(nn.Linear):
    """nn.Linear that skips random init on the meta device (loading fills it; initialising meta
    tensors costs seconds of one-time torch imports and means nothing), and spreads generation's
    decode-step products over the CPU's threads (see decode_kernels)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        splits = gemv_splits(x, self.weight)
        if splits:
            return split_linear(x, self.weight, self.bias, splits)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 like transformers."""

    def __init__(self, d_model: int, eps: float, scope: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.name_scale = f"{scope}.hook_scale"
        self.name_normalized = f"{scope}.hook_normalized"

    def forward(self, x: Tensor, run: HookRun | None = None) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if run is not None and run.listens(self.name_scale):
            variance = x.pow(2).mean(-1, keepdim=True)
            scale = (variance + self.eps).sqrt()  # b p 1, float32
            edited = run(self.name_scale, scale)
            # A hook that only reads the scale must not change the numbers (rsqrt vs divide).
            x = x * torch.rsqrt(variance + self.eps) if edited is scale else x / edited
        elif x.device.type == "cpu":
            # torch's fused CPU kernel gives the same bits as the three ops below (tested), 5 ×
            # faster at 8 × 128 tokens; without the weight so the cast and product stay HF's.
            x = F.rms_norm(x, x.shape[-1:], None, self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x.to(dtype)
        return run(self.name_normalized, out) if run is not None else out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, g, k, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
        self.n_heads, self.n_kv_heads, self.d_head, self.layer = h, g, k, layer
        self.q_proj = Linear(d, h * k, bias=cfg.qkv_bias)
        self.k_proj = Linear(d, g * k, bias=cfg.qkv_bias)
        self.v_proj = Linear(d, g * k, bias=cfg.qkv_bias)
        self.o_proj = Linear(h * k, d, bias=cfg.o_bias)
        self.scaling = k**-0.5
        p = f"blocks.{layer}.attn."
        self.n_q, self.n_k, self.n_v = p + "hook_q", p + "hook_k", p + "hook_v"
        self.n_rot_q, self.n_rot_k = p + "hook_rot_q", p + "hook_rot_k"
        self.n_scores, self.n_pattern = p + "hook_attn_scores", p + "hook_pattern"
        self.n_z, self.n_result = p + "hook_z", p + "hook_result"

    def forward(
        self, x: Tensor, run: HookRun, rope: tuple[Tensor, Tensor], mask: "AttentionMask", past: KVCache | None
    ) -> Tensor:
        b, p, _ = x.shape
        h, g, k = self.n_heads, self.n_kv_heads, self.d_head
        q = run(self.n_q, self.q_proj(x).view(b, p, h, k))
        key = run(self.n_k, self.k_proj(x).view(b, p, g, k))
        v = run(self.n_v, self.v_proj(x).view(b, p, g, k))
        cos, signed_sin = rope
        q = run(self.n_rot_q, apply_rotary(q, cos, signed_sin))
        key = run(self.n_rot_k, apply_rotary(key, cos, signed_sin))
        q, key, v = q.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2)  # b heads p k
        if past is not None:
            key, v = past.write(self.layer, key, v)  # b g s k: cached prefix + these positions
        if run.listens(self.n_scores) or run.listens(self.n_pattern):
            z = self._explicit(q, key, v, run, mask)
        else:
            z = F.scaled_dot_product_attention(
                q, key, v, attn_mask=mask.bool_mask, is_causal=mask.is_causal, enable_gqa=h != g
            )
        z = run(self.n_z, z.transpose(1, 2))  # b p h k
        if run.listens(self.n_result):
            w_o = self.o_proj.weight.view(-1, h, k)  # d h k
            result = run(self.n_result, torch.einsum("bphk,dhk->bphd", z, w_o))
            out = result.sum(dim=2)
            return out + self.o_proj.bias if self.o_proj.bias is not None else out
        return self.o_proj(z.reshape(b, p, h * k))

    def _explicit(self, q: Tensor, key: Tensor, v: Tensor, run: HookRun, mask: "AttentionMask") -> Tensor:
        """Scores and pattern materialised, in transformers' eager op order."""
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            key, v = key.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, key.transpose(2, 3)) * self.scaling  # b h q s
        scores = scores.masked_fill(mask.blocked(q.shape[2], key.shape[2], q.device), float("-inf"))
        scores = run(self.n_scores, scores)
        pattern = run(self.n_pattern, torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        return torch.matmul(pattern, v)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.gate_proj = Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        p = f"blocks.{layer}.mlp."
        self.n_pre, self.n_pre_linear, self.n_post = p + "hook_pre", p + "hook_pre_linear", p + "hook_post"

    def forward(self, x: Tensor, run: HookRun) -> Tensor:
        gate = run(self.n_pre, self.gate_proj(x))
        up = run(self.n_pre_linear, self.up_proj(x))
        return self.down_proj(run(self.n_post, F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model, cfg.norm_eps, f"blocks.{layer}.ln1")
        self.attn = Attention(cfg, layer)
        self.ln2 = RMSNorm(cfg.d_model, cfg.norm_eps, f"blocks.{layer}.ln2")
        self.mlp = MLP(cfg, layer)
        p = f"blocks.{layer}."
        self.n_resid_pre, self.n_attn_out, self.n_resid_mid = p + "hook_resid_pre", p + "hook_attn_out", p + "hook_resid_mid"
        self.n_mlp_out, self.n_resid_post = p + "hook_mlp_out", p + "hook_resid_post"

    def forward(self, resid: Tensor, run: HookRun, rope, mask, past: KVCache | None) -> Tensor:
        resid = run(self.n_resid_pre, resid)
        attn_out = run(self.n_attn_out, self.attn(self.ln1(resid, run), run, rope, mask, past))
        resid = run(self.n_resid_mid, resid + attn_out)
        mlp_out = run(self.n_mlp_out, self.mlp(self.ln2(resid, run), run))
        return run(self.n_resid_post, resid + mlp_out)


class AttentionMask:
    """Causal + padding mask for one forward, built once and shared by every layer.

    Without padding and without a cache, SDPA's own `is_causal` runs and no mask tensor exists.
    A padded query row attends to itself only, so no row is all -inf (no NaN) and real positions
    never see padded keys."""

    def __init__(self, attention_mask: Tensor | None, past_len: int, n_new: int, device: torch.device):
        self.past_len, self.n_new = past_len, n_new
        self.key_valid = None if attention_mask is None else attention_mask.bool()
        self.is_causal = self.key_valid is None and past_len == 0 and n_new > 1
        self._blocked: Tensor | None = None
        if self.key_valid is None and (self.is_causal or n_new == 1):
            self.bool_mask = None
        else:
            self.bool_mask = self.dense(n_new, past_len + n_new, device)

    def blocked(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        """Where attention is NOT allowed, for layers that materialise their scores; built once per
        forward and shared (on a GPU each mask op is a kernel launch per layer otherwise)."""
        if self._blocked is None:
            self._blocked = ~(self.bool_mask if self.bool_mask is not None else self.dense(n_q, n_k, device))
        return self._blocked

    def dense(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        """Boolean [b or 1, 1, q, s] mask, True where attention is allowed."""
        q_pos = torch.arange(self.past_len, self.past_len + n_q, device=device)
        k_pos = torch.arange(n_k, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, None, :n_k]
            allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
        return allowed


class Transformer(nn.Module):
    """Embedding, blocks, final norm and unembedding. The hooked user surface is `HookedCoT`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.d_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.norm_eps, "ln_final")
        self.unembed = Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.register_buffer("inv_freq", inv_freq(cfg.d_head, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    @property
    def W_E(self) -> Tensor:
        """[d_vocab, d_model]"""
        return self.embed.weight

    @property
    def W_U(self) -> Tensor:
        """[d_model, d_vocab] (a transposed view of the unembedding, as in TransformerLens)"""
        return self.unembed.weight.T

    def run_layers(
        self,
        resid: Tensor,
        run: HookRun,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        past: KVCache | None = None,
        start_at_layer: int = 0,
        stop_at_layer: int | None = None,
    ) -> Tensor:
        """Blocks [start_at_layer, stop_at_layer) on the residual `resid` [b p d]."""
        b, p, _ = resid.shape
        past_len = past.length if past is not None else 0
        mask = AttentionMask(attention_mask, past_len, p, resid.device)
        rope = rotary_tables(self.inv_freq, position_ids, resid.dtype)
        for block in self.blocks[start_at_layer:stop_at_layer]:
            resid = block(resid, run, rope, mask, past)
        return resid

    def unembed_resid(self, resid: Tensor, run: HookRun | None = None) -> Tensor:
        return self.unembed(self.ln_final(resid, run))
