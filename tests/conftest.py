"""Tiny random-weight HuggingFace checkpoints covering the architecture quirk matrix.

Each quirk reproduces one real model's peculiarities at toy size (hidden 48-64, 2-3 layers,
vocab 256-384), so parity tests against transformers exercise every code path a real checkpoint
would: qkv bias, tied vs untied embeddings, llama3 / linear rope scaling, rope_theta 1e4 / 1e5 /
5e5 / 1e6, GQA 2:1 / 3:1 / 4:1, an explicit head_dim, attention and MLP biases, sharding.

The folders are built once per test session by transformers itself (`save_pretrained`, fp32,
safetensors), so they are real checkpoints, not hand-written imitations. Weights are re-drawn at
"unit" scale after init: the default init (std 0.02, norms at one, biases at zero) makes attention
almost uniform and hides missing norm multiplies, missing biases and rope mistakes.

Use: a test taking `quirk` runs once per entry of QUIRKS; `tiny_checkpoint` is that quirk's
folder; `tiny_checkpoints` maps every quirk to its folder; `hf_model(name, attn_implementation=
"eager", dtype=torch.float32)` returns transformers' model for a quirk, cached per session (do not
modify it in place).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

# name -> (transformers config class name, config kwargs, save_pretrained kwargs)
QUIRK_SPECS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # Qwen2 / Qwen2.5: qkv bias, tied, rope_theta 1e6, GQA 2:1, bos == eos.
    "qwen2": ("Qwen2Config", dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=300, eos_token_id=300,
    ), {}),
    # DeepSeek-R1-Distill-Qwen: untied, rope_theta 1e4, a bos distinct from eos, window configured but off.
    "r1_distill_qwen": ("Qwen2Config", dict(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, rms_norm_eps=1e-6,
        tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=370, eos_token_id=371,
        use_sliding_window=False, sliding_window=4096, max_window_layers=21,
    ), {}),
    # Llama-3.2-1B: llama3 rope scaling (factor 32), rope_theta 5e5, tied, GQA 4:1, eos list.
    "llama32": ("LlamaConfig", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=250, eos_token_id=[251, 252],
    ), {}),
    # An explicit head_dim (32) different from hidden_size / heads (16).
    "llama_head_dim": ("LlamaConfig", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e4, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ), {}),
    # attention_bias (q, k, v and o) and mlp_bias on, linear rope scaling, plain multi-head attention.
    "llama_bias": ("LlamaConfig", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4, rms_norm_eps=1e-6,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ), {}),
    # R1-Distill-Llama-8B-like (llama3 rope factor 8, untied) saved as an index + several shards.
    "llama_sharded": ("LlamaConfig", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=1, eos_token_id=2,
    ), {"max_shard_size": "60KB"}),
    # SmolLM2: tied, GQA 3:1, rope_theta 1e5, pad == eos.
    "smollm2_like": ("LlamaConfig", dict(
        vocab_size=288, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, rope_theta=1e5, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    ), {}),
}
QUIRKS = list(QUIRK_SPECS)


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights: embeddings N(0, 1), matrices N(0, 1/fan_in) so activations stay
    O(1) and attention is far from uniform, norm weights 1 + N(0, 0.25^2), biases N(0, 0.3^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # tied weights are listed once
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "embed_tokens" in name:
            param.copy_(noise)
        elif param.ndim == 2:
            param.copy_(noise / param.shape[1] ** 0.5)
        elif "norm" in name:
            param.copy_(1.0 + 0.25 * noise)
        else:
            param.copy_(0.3 * noise)


def build_tiny_checkpoint(name: str, folder: Path) -> Path:
    """Build quirk `name` with transformers and save it into `folder` (fp32, safetensors)."""
    import transformers

    config_cls, config_kwargs, save_kwargs = QUIRK_SPECS[name]
    config = getattr(transformers, config_cls)(**config_kwargs)
    torch.manual_seed(_seed(name))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model, _seed(name))
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {name: build_tiny_checkpoint(name, root / name) for name in QUIRKS}


@pytest.fixture(params=QUIRKS)
def quirk(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_checkpoint(tiny_checkpoints: dict[str, Path], quirk: str) -> Path:
    return tiny_checkpoints[quirk]


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoints: dict[str, Path]):
    """hf_model(name, attn_implementation="eager", dtype=torch.float32) -> transformers model (eval)."""
    from transformers import AutoModelForCausalLM

    cache: dict[tuple[str, str, torch.dtype], torch.nn.Module] = {}

    def get(name: str, attn_implementation: str = "eager", dtype: torch.dtype = torch.float32):
        key = (name, attn_implementation, dtype)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(
                tiny_checkpoints[name], attn_implementation=attn_implementation, dtype=dtype
            )
            cache[key] = model.eval()
        return cache[key]

    return get


# ---------------------------------------------------------------------- the embedded SmolLM2 GGUF
@pytest.fixture(scope="session")
def smol_path() -> Path:
    from hookedcot.embedded import embedded_model_path

    return embedded_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol(smol_path):
    """The converted checkpoint (config + tensor refs + tokenizer), read once per session."""
    from hookedcot.conversions.gguf import convert_gguf

    return convert_gguf(smol_path)


@pytest.fixture(scope="session")
def smol_model(smol):
    """hookedcot's SmolLM2-135M-Instruct in float32 (do not modify it)."""
    from hookedcot import HookedCoT
    from hookedcot.loading import build_model

    return build_model(HookedCoT, smol, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def smol_hf(smol_path):
    """transformers' model from the same GGUF file (its own loader; needs accelerate)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    return model.eval()
