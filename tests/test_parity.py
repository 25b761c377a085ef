"""Logit and activation parity with transformers on the quirk matrix of tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from hookedcot import HookedCoT

SEQ = 72  # long enough that rope scaling (llama3, linear) changes the logits measurably
_MODELS: dict[tuple[str, torch.dtype], HookedCoT] = {}


def ours(tiny_checkpoints, name: str, dtype: torch.dtype = torch.float32) -> HookedCoT:
    key = (name, dtype)
    if key not in _MODELS:
        _MODELS[key] = HookedCoT.from_pretrained(tiny_checkpoints[name], dtype=dtype)
    return _MODELS[key]


def prompts(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of three rows (72, 50 and 9 real tokens) and its mask."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (3, SEQ), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, : SEQ - 50] = 0
    mask[2, : SEQ - 9] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_fp32_logits_match_transformers(tiny_checkpoints, hf_model, quirk, attn):
    model, hf = ours(tiny_checkpoints, quirk), hf_model(quirk, attn)
    tokens, mask = prompts(model.cfg.d_vocab)
    single = tokens[:1]
    assert rel_err(model(single), hf(single).logits) <= 1e-4
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(tokens, attention_mask=mask, position_ids=pos).logits
    got = model(tokens, attention_mask=mask)
    real = mask.bool()
    assert rel_err(got[real], ref[real]) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_logits_bit_identical_to_transformers_sdpa(tiny_checkpoints, hf_model, quirk, dtype):
    """Where the op order is transformers' (SDPA, F.linear, the fused CPU RMSNorm that gives the
    same bits), the logits are the same floats, padded batch included."""
    model, hf = ours(tiny_checkpoints, quirk, dtype), hf_model(quirk, "sdpa", dtype)
    tokens, mask = prompts(model.cfg.d_vocab, seed=5)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    assert torch.equal(model(tokens[:1]), hf(tokens[:1]).logits)
    assert torch.equal(model(tokens, attention_mask=mask)[real], hf(tokens, attention_mask=mask, position_ids=pos).logits[real])


@torch.no_grad()
def test_bf16_top1_agreement(tiny_checkpoints, hf_model, quirk):
    model, hf = ours(tiny_checkpoints, quirk, torch.bfloat16), hf_model(quirk, "sdpa", torch.bfloat16)
    tokens, _ = prompts(model.cfg.d_vocab, seed=1)
    agree = (model(tokens).argmax(-1) == hf(tokens).logits.argmax(-1)).float().mean()
    assert agree >= 0.99, float(agree)


@torch.no_grad()
def test_hooks_equal_transformers_intermediates(tiny_checkpoints, hf_model, quirk):
    model, hf = ours(tiny_checkpoints, quirk), hf_model(quirk, "eager")
    tokens, mask = prompts(model.cfg.d_vocab, seed=2)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = hf(tokens, attention_mask=mask, position_ids=pos, output_hidden_states=True, output_attentions=True)
    _, cache = model.run_with_cache(tokens, attention_mask=mask,
                                    names_filter=lambda n: n.endswith(("resid_pre", "resid_post", "hook_pattern")))
    real = mask.bool()
    n = model.cfg.n_layers
    for layer in range(n):
        torch.testing.assert_close(cache["resid_pre", layer][real], out.hidden_states[layer][real], rtol=1e-5, atol=1e-5)
        q_real = real[:, None, :, None].expand_as(out.attentions[layer])
        torch.testing.assert_close(cache["pattern", layer][q_real], out.attentions[layer][q_real], rtol=1e-5, atol=1e-6)
    # HF's last hidden state is after the final norm; ours before it: compare through the norm.
    torch.testing.assert_close(model.ln_final(cache["resid_post", n - 1])[real], out.hidden_states[n][real], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kv_cache_prefill_then_decode_matches_full_forward(tiny_checkpoints, quirk):
    from hookedcot import KVCache

    model = ours(tiny_checkpoints, quirk)
    tokens, mask = prompts(model.cfg.d_vocab, seed=3)
    full = model(tokens, attention_mask=mask)
    cache = KVCache(model.cfg, 3, SEQ, model.dtype, model.device)
    split = SEQ - 5
    parts = [model(tokens[:, :split], attention_mask=mask[:, :split], past_kv=cache)]
    for i in range(split, SEQ):
        parts.append(model(tokens[:, i : i + 1], attention_mask=mask[:, : i + 1], past_kv=cache))
    stepped = torch.cat(parts, dim=1)
    real = mask.bool()
    assert rel_err(stepped[real], full[real]) <= 1e-5


@torch.no_grad()
def test_greedy_generation_matches_transformers(tiny_checkpoints, hf_model, quirk):
    model, hf = ours(tiny_checkpoints, quirk), hf_model(quirk, "sdpa")
    tokens, mask = prompts(model.cfg.d_vocab, seed=4)
    tokens, mask = tokens[:, -12:], mask[:, -12:]
    mask[2, :3] = 0  # the third row is padded within the last 12 positions
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens = tokens.masked_fill(mask == 0, pad)
    ours_out = model.generate(tokens, 20, attention_mask=mask, stop_at_eos=False)
    with_hook = model.generate(tokens, 20, attention_mask=mask, stop_at_eos=False,
                               fwd_hooks=[(lambda name: name.endswith("resid_post"), lambda x, h: None)])
    theirs = hf.generate(tokens, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                         pad_token_id=pad)
    assert torch.equal(ours_out, theirs)
    assert torch.equal(with_hook, theirs)
