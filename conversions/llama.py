"""LLaMA family: LLaMA-3.x, DeepSeek-R1-Distill-Llama and SmolLM2.

Quirks, as transformers' Llama implements them: biases are switched by `attention_bias` (q, k, v
and o together) and `mlp_bias`; `head_dim` may differ from hidden_size / num_attention_heads;
LLaMA-3.1+ uses llama3 rope scaling (rope_theta 5e5); SmolLM2 ties its embeddings and uses
rope_theta 1e5 with 3:1 GQA. `pretraining_tp > 1` (a sliced matmul in old transformers) and
interleaved rope (`rope_interleaved: true`, a different q/k layout) are refused. The tensor
layout is the HuggingFace one, so conversion is a rename.
"""

from __future__ import annotations

from typing import Any

from hookedcot.conversions.hf_config import FamilySpec

_DEFAULTS: dict[str, Any] = {  # transformers' LlamaConfig defaults, for keys a config.json omits
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "attention_bias": False,
    "mlp_bias": False,
}


def _biases(cfg: dict[str, Any]) -> dict[str, bool]:
    attention_bias = bool(cfg.get("attention_bias") or _DEFAULTS["attention_bias"])
    return {
        "qkv_bias": attention_bias,
        "o_bias": attention_bias,
        "mlp_bias": bool(cfg.get("mlp_bias") or _DEFAULTS["mlp_bias"]),
    }


SPEC = FamilySpec(
    family="llama",
    model_type="llama",
    architectures=("LlamaForCausalLM",),
    defaults=_DEFAULTS,
    family_keys=frozenset({"attention_bias", "mlp_bias", "is_llama_config"}),
    pinned={
        "pretraining_tp": ((1, None), "tensor-parallel sliced matmuls are not implemented"),
        "rope_interleaved": ((False, None), "interleaved (GPT-J style) rope is not implemented"),
    },
    biases=_biases,
)

