"""The models TL's ported tests run on (see conftest.py): `smollm2()`, `tiny_model()`, `tl_config()`."""

from __future__ import annotations

import functools

import torch

from hookedcot import HookedCoT, ModelConfig

SMOLLM2 = "smollm2-135m-instruct"


@functools.lru_cache(maxsize=None)
def smollm2() -> HookedCoT:
    return HookedCoT.from_pretrained(SMOLLM2)


def tl_config(**kw) -> ModelConfig:
    """A HookedTransformerConfig's kwargs as a ModelConfig: TL's sizes carried over, LLaMA's
    architecture (RMSNorm, rotary, gated SiLU MLP) in place of TL's choices; any other keyword that
    ModelConfig has (e.g. use_hook_tokens, once it exists) is passed through, the rest
    (attn_only, normalization_type, positional_embedding_type, tokenizer_name...) dropped.
    An odd d_head is rounded up to even, as rotary requires."""
    import dataclasses

    n_heads = kw.get("n_heads", 4)
    d_model = kw.get("d_model", 64)
    d_head = kw.get("d_head", d_model // n_heads)
    d_head += d_head % 2  # rotary needs an even d_head (TL's tiny configs use 1 or 5)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    known = {"n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn"}
    extra = {k: v for k, v in kw.items() if k in fields and k not in known}
    return ModelConfig(
        n_layers=kw.get("n_layers", 2), d_model=d_model, n_heads=n_heads,
        n_key_value_heads=kw.get("n_key_value_heads") or n_heads, d_head=d_head,
        d_mlp=kw.get("d_mlp") or 4 * d_model, d_vocab=kw.get("d_vocab") or 49152,
        n_ctx=kw.get("n_ctx", 2048), act_fn="silu", family="llama", **extra,  # special ids: the tokenizer's, as in TL
    )


def random_hooked(cfg: ModelConfig, tokenizer=None, seed: int = 0, noise: float = 0.3) -> HookedCoT:
    torch.manual_seed(seed)
    model = HookedCoT(cfg, tokenizer=tokenizer).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


@functools.lru_cache(maxsize=None)
def tiny_model(n_layers: int = 2, noise: float = 0.3) -> HookedCoT:
    """A random `n_layers`-layer model that tokenizes like SmolLM2 (TL's tests use real words)."""
    cfg = tl_config(n_layers=n_layers, d_model=64, n_heads=4, n_key_value_heads=2, d_mlp=128, d_vocab=49152)
    return random_hooked(cfg, tokenizer=smollm2().tokenizer, noise=noise)


def einsum(equation: str, *tensors: torch.Tensor) -> torch.Tensor:
    """fancy_einsum's `einsum(equation, *tensors)` (not installed here), on einops."""
    import einops

    return einops.einsum(*tensors, equation)


@functools.lru_cache(maxsize=None)
def hf_tokenizer(**kwargs):
    """SmolLM2's tokenizer as a transformers tokenizer, read from the embedded GGUF (no network):
    stands in where TL's tests call `AutoTokenizer.from_pretrained("gpt2")`."""
    from transformers import AutoTokenizer

    from hookedcot.embedded import embedded_model_path

    path = embedded_model_path(SMOLLM2)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
