"""Real weights: the embedded SmolLM2-135M-Instruct against transformers loading the same GGUF file —
greedy generation token for token (with and without a hook, batched with left padding), and hooks
during generation."""

from __future__ import annotations

import torch

PROMPTS = [
    "What is 12 times 7? Think step by step.",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Write a haiku about the sea.",
]


def chat(model, text: str) -> str:
    return model.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


@torch.no_grad()
def test_greedy_generation_matches_transformers_for_64_tokens(smol_model, smol_hf):
    model = smol_model
    noop = [(lambda name: name.endswith("resid_post"), lambda x, hook: None)]
    for text in PROMPTS:
        tokens = model.to_tokens(chat(model, text))
        # Both stop at the model's eos (<|im_end|>); min_new_tokens would make transformers suppress it.
        theirs = smol_hf.generate(tokens, max_new_tokens=64, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        assert theirs.shape[1] - tokens.shape[1] >= 20, "too short a completion to compare"
        assert torch.equal(model.generate(tokens, 64), theirs), text
        if text == PROMPTS[0]:  # a no-op hook on every layer changes nothing
            assert torch.equal(model.generate(tokens, 64, fwd_hooks=noop), theirs), text


@torch.no_grad()
def test_batched_left_padded_generation_matches_transformers(smol_model, smol_hf):
    model = smol_model
    tokens, mask = model.tokenize([chat(model, t) for t in PROMPTS])
    assert not bool(mask.all())
    ours = model.generate(tokens, 24, attention_mask=mask)
    theirs = smol_hf.generate(tokens, attention_mask=mask, max_new_tokens=24, do_sample=False,
                              pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_generation_stops_at_eos_and_returns_text(smol_model):
    model = smol_model
    prompt = chat(model, PROMPTS[1])
    text = model.generate(prompt, 96)
    assert text.startswith(prompt) and text.endswith("<|im_end|>")
    assert "7" in text[len(prompt):]


@torch.no_grad()
def test_hooks_during_generation_see_positions_and_steer(smol_model):
    model = smol_model
    tokens = model.to_tokens(chat(model, PROMPTS[2]))
    n = tokens.shape[1]
    seen = []
    base = model.generate(tokens, 8, stop_at_eos=False,
                          fwd_hooks=[("blocks.10.hook_resid_post", lambda x, h: seen.append(h.positions.tolist()))])
    assert seen[0] == list(range(n)) and seen[1:] == [[n + i] for i in range(7)]
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def add(scale: float):
        return [("blocks.10.hook_resid_post", lambda x, h: x + scale * v * (h.positions >= n)[None, :, None])]

    assert torch.equal(model.generate(tokens, 8, stop_at_eos=False, fwd_hooks=add(0.0)), base)
    steered = model.generate(tokens, 8, stop_at_eos=False, fwd_hooks=add(30.0))
    assert torch.equal(steered[:, : n + 1], base[:, : n + 1])  # the first new token comes from the prompt
    assert not torch.equal(steered, base)
