"""Random-weight HookedCoT models for tests that need no checkpoint on disk."""

from __future__ import annotations

from typing import Any

import torch

from hookedcot import HookedCoT, ModelConfig


def random_model(cfg: ModelConfig, noise: float = 0.3, seed: int = 0, tokenizer: Any = None) -> HookedCoT:
    """A model with default init plus N(0, noise²) on every parameter (norm weights and biases
    included, so a missing weight multiply or bias cannot hide)."""
    torch.manual_seed(seed)
    model = HookedCoT(cfg, tokenizer=tokenizer).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


class CharTokenizer:
    """One token per ASCII character (id = ord), left padding with id 0: enough of the tokenizer
    interface for labels, strings and chat prompts."""

    eos_token_ids: list[int] = []
    pad_token_id = 0

    def tokenize(self, text, prepend_bos=None):
        texts = [text] if isinstance(text, str) else list(text)
        n = max(len(t) for t in texts)
        tokens = torch.zeros(len(texts), n, dtype=torch.long)
        mask = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            tokens[i, n - len(t):] = torch.tensor([ord(c) for c in t])
            mask[i, n - len(t):] = 1
        return tokens, mask

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def token_strings(self, ids):
        return [chr(i) for i in ids]

    def to_single_token(self, text):
        if len(text) != 1:
            raise ValueError(f"{text!r} is {len(text)} tokens")
        return ord(text)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        body = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")
