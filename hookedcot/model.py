"""The transformer: RMSNorm, rotary attention with GQA, SwiGLU MLP, blocks, and the forward pass.

One file that reads top to bottom; `Transformer.forward` is the whole computation (embed, blocks,
final norm, unembed). Every hook point of the contract (hook_names.py) is a call `run(name, x)`,
which is a dict lookup and nothing more when no hook listens there; each module holds its hook
names as `hook_*` attributes (`model.blocks[3].attn.hook_q == "blocks.3.attn.hook_q"`). Attention
runs the fused `scaled_dot_product_attention` unless a hook or the cache asks for the scores or
the pattern; then the explicit path builds them. Architecture differences are config fields.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookedcot.config import ModelConfig
from hookedcot.device_map import Placement, on_device, to_block_device
from hookedcot.placed_cache import place_cache
from hookedcot.hook_points import HookRun
from hookedcot.kernels import linear
from hookedcot.kv_cache import KVCache
from hookedcot.rope import apply_rotary, inv_freq, rotary_tables
from hookedcot.tl_weights import AttentionWeights, MLPWeights, ModelWeights


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 like transformers."""

    def __init__(self, d_model: int, eps: float, scope: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.hook_scale = f"{scope}.hook_scale"
        self.hook_normalized = f"{scope}.hook_normalized"

    def forward(self, x: Tensor, run: HookRun | None = None) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if run is not None and run.listens(self.hook_scale):
            variance = x.pow(2).mean(-1, keepdim=True)
            scale = (variance + self.eps).sqrt()  # b p 1, float32
            edited = run(self.hook_scale, scale)
            # A hook that only reads the scale must not change the numbers (rsqrt vs divide).
            x = x * torch.rsqrt(variance + self.eps) if edited is scale else x / edited
        elif x.device.type == "cpu":
            # torch's fused CPU kernel: the same bits as the three ops below (tested), and faster;
            # without the weight so the cast and product stay HF's.
            x = F.rms_norm(x, x.shape[-1:], None, self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x.to(dtype)
        return run(self.hook_normalized, out) if run is not None else out


class Attention(nn.Module, AttentionWeights):
    """Rotary attention with GQA; `W_Q`, `W_O`, `OV`, ... are TransformerLens views (tl_weights.py)."""

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
        self.hook_q, self.hook_k, self.hook_v = p + "hook_q", p + "hook_k", p + "hook_v"
        self.hook_rot_q, self.hook_rot_k = p + "hook_rot_q", p + "hook_rot_k"
        self.hook_attn_scores, self.hook_pattern = p + "hook_attn_scores", p + "hook_pattern"
        self.hook_z, self.hook_result = p + "hook_z", p + "hook_result"

    def forward(
        self, x: Tensor, run: HookRun, rope: tuple[Tensor, Tensor], mask: "AttentionMask", past: KVCache | None,
        split: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """`x`: the normed residual [b p d]; or `split`: normed per-head inputs of the queries
        [b p h d], keys and values [b p g d] (TransformerLens' split q/k/v input)."""
        b, p, _ = x.shape
        h, g, k = self.n_heads, self.n_kv_heads, self.d_head
        if split is None:
            q, key, v = self.q_proj(x).view(b, p, h, k), self.k_proj(x).view(b, p, g, k), self.v_proj(x).view(b, p, g, k)
        else:
            q, key, v = (_per_head(inp, proj, k) for inp, proj in zip(split, (self.q_proj, self.k_proj, self.v_proj)))
        q = run(self.hook_q, q)
        key = run(self.hook_k, key)
        v = run(self.hook_v, v)
        cos, signed_sin = rope
        q = run(self.hook_rot_q, apply_rotary(q, cos, signed_sin))
        key = run(self.hook_rot_k, apply_rotary(key, cos, signed_sin))
        q, key, v = q.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2)  # b heads p k
        explicit = run.listens(self.hook_attn_scores) or run.listens(self.hook_pattern)
        if past is not None and past.shared_prefix and not explicit:
            key, v = past.write_own(self.layer, key, v)  # b g s k: the positions after the shared prefix
            z = self._shared_prefix(q, key, v, *past.prefix(self.layer), mask)
        else:
            if past is not None:
                key, v = past.write(self.layer, key, v)  # b g s k: cached prefix + these positions
            if explicit:
                z = self._explicit(q, key, v, run, mask)
            else:
                z = F.scaled_dot_product_attention(
                    q, key, v, attn_mask=mask.bool_mask, is_causal=mask.is_causal, enable_gqa=h != g
                )
        z = run(self.hook_z, z.transpose(1, 2))  # b p h k
        if run.listens(self.hook_result):
            w_o = self.o_proj.weight.view(-1, h, k)  # d h k
            result = run(self.hook_result, torch.einsum("bphk,dhk->bphd", z, w_o))
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
        scores = run(self.hook_attn_scores, scores)
        pattern = run(self.hook_pattern, torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        return torch.matmul(pattern, v)

    def _shared_prefix(self, q: Tensor, key: Tensor, v: Tensor, prefix_key: Tensor, prefix_v: Tensor,
                       mask: "AttentionMask") -> Tensor:
        """Attention over [shared prefix ‖ each row's own positions] (SharedPrefixKVCache): the
        prefix part is ONE matrix product for every row and query head of a kv group, [g, b·rep·q, k]
        @ [g, k, P], where an expanded cache does b matrix-vector products over b copies; the own
        part is per row; one softmax over both (float32, as the explicit path's).
        q: b h q k; key/v: b g s k; prefix_key/prefix_v: g P k."""
        if mask.key_valid is not None:
            raise ValueError(
                "a shared-prefix KV cache has no padding: every row continues the same prefix; pass "
                "attention_mask=None (or all ones), or use a KVCache per row for padded batches"
            )
        b, h, n, k = q.shape
        g, n_pre, s = self.n_kv_heads, prefix_key.shape[1], key.shape[2]
        rn = h // g * n  # query rows per kv head and batch row: (rep, q)
        q = q.reshape(b, g, rn, k).transpose(0, 1)  # g b rn k
        pre = torch.matmul(q.reshape(g, b * rn, k), prefix_key.transpose(1, 2)).view(g, b, rn, n_pre)
        own = torch.matmul(q, key.transpose(0, 1).transpose(2, 3))  # g b rn s
        scores = torch.cat([pre, own], dim=-1) * self.scaling
        if n > 1:  # causal within the new positions; the prefix is visible to all
            blocked = torch.arange(s, device=q.device)[None] > torch.arange(s - n, s, device=q.device)[:, None]
            scores[..., n_pre:].masked_fill_(blocked.repeat(h // g, 1), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        z = torch.matmul(probs[..., :n_pre].reshape(g, b * rn, n_pre), prefix_v).view(g, b, rn, k)
        z = z + torch.matmul(probs[..., n_pre:], v.transpose(0, 1))
        return z.transpose(0, 1).reshape(b, h, n, k)


def _per_head(inp: Tensor, proj: nn.Linear, d_head: int) -> Tensor:
    """[b p heads d] inputs, one per head, through `proj`'s rows for that head -> [b p heads d_head]."""
    heads = inp.shape[2]
    out = torch.einsum("bpnd,nkd->bpnk", inp, proj.weight.view(heads, d_head, -1))
    return out + proj.bias.view(heads, d_head) if proj.bias is not None else out


class MLP(nn.Module, MLPWeights):
    """SwiGLU: down(silu(gate(x)) * up(x)); `W_in`, `W_gate`, `W_out` are TL views (tl_weights.py)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.gate_proj = Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        p = f"blocks.{layer}.mlp."
        self.hook_pre, self.hook_pre_linear, self.hook_post = p + "hook_pre", p + "hook_pre_linear", p + "hook_post"

    def forward(self, x: Tensor, run: HookRun) -> Tensor:
        gate = run(self.hook_pre, self.gate_proj(x))
        up = run(self.hook_pre_linear, self.up_proj(x))
        return self.down_proj(run(self.hook_post, F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model, cfg.norm_eps, f"blocks.{layer}.ln1")
        self.attn = Attention(cfg, layer)
        self.ln2 = RMSNorm(cfg.d_model, cfg.norm_eps, f"blocks.{layer}.ln2")
        self.mlp = MLP(cfg, layer)
        p = f"blocks.{layer}."
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = p + "hook_resid_pre", p + "hook_attn_out", p + "hook_resid_mid"
        self.hook_mlp_out, self.hook_resid_post = p + "hook_mlp_out", p + "hook_resid_post"
        self.hook_q_input, self.hook_k_input, self.hook_v_input = p + "hook_q_input", p + "hook_k_input", p + "hook_v_input"
        self.hook_mlp_in = p + "hook_mlp_in"

    def forward(self, resid: Tensor, run: HookRun, rope, mask, past: KVCache | None) -> Tensor:
        resid = run(self.hook_resid_pre, resid)
        split = self._split_inputs(resid, run) if run.listens(self.hook_q_input) or run.listens(
            self.hook_k_input) or run.listens(self.hook_v_input) else None
        ln1_hooked = run.listens(self.ln1.hook_scale) or run.listens(self.ln1.hook_normalized)
        # With split inputs attention reads the per-head copies; ln1 on the residual runs only for its hooks.
        attn_in = self.ln1(resid, run) if split is None or ln1_hooked else resid
        attn_out = run(self.hook_attn_out, self.attn(attn_in, run, rope, mask, past, split))
        resid = run(self.hook_resid_mid, resid + attn_out)
        mlp_in = run(self.hook_mlp_in, resid.clone()) if run.listens(self.hook_mlp_in) else resid
        mlp_out = run(self.hook_mlp_out, self.mlp(self.ln2(mlp_in, run), run))
        return run(self.hook_resid_post, resid + mlp_out)

    def _split_inputs(self, resid: Tensor, run: HookRun) -> tuple[Tensor, Tensor, Tensor]:
        """TransformerLens' split input: one copy of the residual per query head and per key/value
        head, hooked, then each through ln1 (without ln1's hooks, which saw the residual itself)."""
        b, p, d = resid.shape
        heads = (self.attn.n_heads, self.attn.n_kv_heads, self.attn.n_kv_heads)
        names = (self.hook_q_input, self.hook_k_input, self.hook_v_input)
        return tuple(self.ln1(run(name, resid[:, :, None, :].expand(b, p, n, d).clone()))
                     for name, n in zip(names, heads))


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


class Transformer(nn.Module, ModelWeights):
    """Embedding, blocks, final norm and unembedding. The hooked user surface is `HookedCoT`;
    TransformerLens' weight names (`W_E`, `W_U`, `W_Q` stacked, `OV`, ...) are in tl_weights.py."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = "hook_embed"
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.norm_eps, "ln_final")
        self.hook_unembed_in, self.hook_unembed_out = "unembed.hook_in", "unembed.hook_out"
        self.unembed = Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.register_buffer("inv_freq", inv_freq(cfg.d_head, cfg.rope_theta, cfg.rope_scaling), persistent=False)
        self.placement: Placement | None = None  # set by a device_map load (device_map.py); None: one device

    def forward(
        self,
        x: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        run: HookRun,
        position_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch past_and_pos"] | None = None,
        past: KVCache | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        last_logits_only: bool = False,
        logits: bool = True,
    ) -> Tensor | None:
        """Token ids (or embeddings) -> logits [b p vocab]; with `start_at_layer`, `x` is the
        residual entering that block; with `stop_at_layer`, the residual entering that block is
        returned. `attention_mask` (None: no padding) covers the cached prefix of `past`, which
        this forward extends. `last_logits_only` unembeds the last position only;
        `logits=False` runs for the hooks alone (the final norm runs if one listens to it)."""
        if start_at_layer is None:
            resid = run(self.hook_embed, x if x.is_floating_point() else self.embed(x))
        else:
            resid = x
        p = resid.shape[1]
        inv_freq = self.inv_freq
        if self.placement is not None:  # a split model's inputs may come from another device (start_at_layer)
            position_ids, inv_freq = on_device(position_ids, resid.device), on_device(inv_freq, resid.device)
            attention_mask = None if attention_mask is None else on_device(attention_mask, resid.device)
        if past is not None and past.static:  # fixed shapes: attends over every slot (kv_cache.StaticKVCache)
            mask = past.step_mask(attention_mask, p)
        else:
            mask = AttentionMask(attention_mask, past.length if past is not None else 0, p, resid.device)
        rope = rotary_tables(inv_freq, position_ids, resid.dtype)
        if self.placement is not None and past is not None:
            place_cache(past, self.placement.blocks)  # once per cache: each layer's buffer to its block's device
        for block in self.blocks[start_at_layer:stop_at_layer]:
            if self.placement is not None:  # split across devices: move at the block boundary only
                resid, rope, mask = to_block_device(self.placement.blocks[block.attn.layer], resid, rope, mask)
            resid = block(resid, run, rope, mask, past)
        if past is not None:
            past.advance(p)
        if stop_at_layer is not None:
            return resid
        if not logits:
            if run.listens(self.ln_final.hook_scale) or run.listens(self.ln_final.hook_normalized):
                self.ln_final(resid if self.placement is None else on_device(resid, self.placement.ln_final), run)
            return None
        logits = self.unembed_resid(resid, run, last_only=last_logits_only)
        return logits if self.placement is None else on_device(logits, self.placement.embed)  # where the tokens are

    def unembed_resid(
        self, resid: Float[Tensor, "... pos d_model"], run: HookRun | None = None, last_only: bool = False
    ) -> Float[Tensor, "... pos d_vocab"]:
        """The logits a residual stands for: final norm, then unembedding (the logit lens). With
        `last_only`, only the last position is unembedded; the norm's hooks still see them all."""
        if self.placement is not None:
            resid = on_device(resid, self.placement.ln_final)
        normed = self.ln_final(resid, run)
        normed = normed[..., -1:, :] if last_only else normed
        if self.placement is not None:
            normed = on_device(normed, self.placement.unembed)
        if run is None:
            return self.unembed(normed)
        return run(self.hook_unembed_out, self.unembed(run(self.hook_unembed_in, normed)))


class Linear(nn.Linear):
    """nn.Linear whose product picks its kernel by shape (kernels.py: decode-step products spread
    over the CPU's threads, same bits), and that skips random init on the meta device: loading
    fills the weights, and initialising meta tensors costs one-time torch imports and means nothing."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()

    # TransformerLens' names for the unembedding (`model.unembed.W_U`), on every Linear: one class
    # for every product keeps the model file short.
    @property
    def W_U(self) -> Tensor:
        """[d_in, d_out]: a transposed view of the weight (for the unembedding, [d_model, d_vocab])."""
        return self.weight.T

    @property
    def b_U(self) -> Tensor:
        """[d_out]: the bias, or zeros."""
        return self.bias if self.bias is not None else self.weight.new_zeros(self.weight.shape[0])


class Embedding(nn.Embedding):
    """nn.Embedding that skips random init on the meta device (see Linear)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()

    @property
    def W_E(self) -> Tensor:
        """[d_vocab, d_model]: the weight (TransformerLens' `model.embed.W_E`)."""
        return self.weight
