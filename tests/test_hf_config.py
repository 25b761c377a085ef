"""config.json -> ModelConfig: real configs translate, the quirk matrix matches transformers, and
everything hookedcot does not implement is refused with a message naming the field."""

from __future__ import annotations

import copy
import warnings

import pytest

from hookedcot.conversions import ConversionError, llama, qwen2
from hookedcot.conversions.hf_config import UnknownConfigKeysWarning
from hookedcot.conversions.hf_config import config_from_hf
from hookedcot.conversions.registry import convert_hf_folder, family_for
from hookedcot.config import ConfigError

_LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}

# Copies of the released config.json files (as on the hub, transformers 4.x spellings).
QWEN2_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN25_MATH_1_5B = {**QWEN2_1_5B, "max_position_embeddings": 4096, "max_window_layers": 21,
                    "rope_theta": 10000.0, "sliding_window": 4096, "use_mrope": False,
                    "transformers_version": "4.37.0"}
R1_DISTILL_QWEN_1_5B = {**QWEN2_1_5B, "max_window_layers": 21, "rope_theta": 10000, "sliding_window": 4096,
                        "tie_word_embeddings": False, "use_mrope": False, "transformers_version": "4.44.0"}
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": _LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
R1_DISTILL_LLAMA_8B = {**LLAMA_3_2_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                       "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}, "tie_word_embeddings": False}
del R1_DISTILL_LLAMA_8B["head_dim"]
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152,
}
# The same Qwen2 config as transformers 5 writes it.
QWEN2_V5 = {k: v for k, v in QWEN2_1_5B.items() if k not in ("rope_theta", "torch_dtype")} | {
    "dtype": "bfloat16", "layer_types": ["full_attention"] * 28, "pad_token_id": None,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "sliding_window": None,
    "transformers_version": "5.24.0",
}

REAL = {
    "qwen2-1.5b": (qwen2, QWEN2_1_5B, dict(d_head=128, n_key_value_heads=2, rope_theta=1e6, tie_embeddings=True)),
    "qwen2.5-math-1.5b": (qwen2, QWEN25_MATH_1_5B, dict(rope_theta=1e4, n_ctx=4096)),
    "r1-distill-qwen-1.5b": (qwen2, R1_DISTILL_QWEN_1_5B, dict(rope_theta=1e4, tie_embeddings=False)),
    "qwen2-v5": (qwen2, QWEN2_V5, dict(rope_theta=1e6, pad_token_id=None)),
    "llama-3.2-1b": (llama, LLAMA_3_2_1B, dict(d_head=64, n_key_value_heads=8, rope_theta=5e5,
                                                 rope_scaling=_LLAMA3_ROPE, tie_embeddings=True, norm_eps=1e-5)),
    "r1-distill-llama-8b": (llama, R1_DISTILL_LLAMA_8B, dict(d_head=128, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                                                             tie_embeddings=False, qkv_bias=False)),
    "smollm2-135m": (llama, SMOLLM2_135M, dict(d_head=64, n_heads=9, n_key_value_heads=3, rope_theta=1e5,
                                                rope_scaling=None, tie_embeddings=True, pad_token_id=2)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_translate_strictly(name):
    family, cfg, expected = REAL[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = config_from_hf(family.SPEC, copy.deepcopy(cfg), strict=True)
    got = {key: getattr(out, key) for key in expected}
    assert got == expected
    assert out.family == cfg["model_type"] and out.qkv_bias == (family is qwen2) and not out.o_bias


def test_quirk_config_matches_transformers(tiny_checkpoint, quirk):
    """Every number the forward pass reads equals what transformers' own config resolves to."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(tiny_checkpoint)
    cfg = convert_hf_folder(tiny_checkpoint).config
    rope = hf.rope_parameters
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_mlp, cfg.d_vocab) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
        hf.intermediate_size, hf.vocab_size,
    )
    assert cfg.d_head == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.norm_eps == hf.rms_norm_eps and cfg.n_ctx == hf.max_position_embeddings
    assert cfg.rope_theta == rope["rope_theta"]
    if rope["rope_type"] == "default":
        assert cfg.rope_scaling is None
    else:
        assert cfg.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    attention_bias = hf.model_type == "qwen2" or hf.attention_bias
    assert (cfg.qkv_bias, cfg.o_bias) == (attention_bias, hf.model_type != "qwen2" and hf.attention_bias)
    assert cfg.mlp_bias == bool(getattr(hf, "mlp_bias", False))


def test_old_and_new_rope_spellings_agree():
    old = {**LLAMA_3_2_1B}
    new = {k: v for k, v in LLAMA_3_2_1B.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {**_LLAMA3_ROPE, "rope_theta": 500000.0}
    legacy_type = {**LLAMA_3_2_1B, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert config_from_hf(llama.SPEC, old) == config_from_hf(llama.SPEC, new)
    assert config_from_hf(llama.SPEC, legacy_type).rope_scaling == {"rope_type": "linear", "factor": 4.0}
    no_original = {**LLAMA_3_2_1B, "rope_scaling": {k: v for k, v in _LLAMA3_ROPE.items()
                                                    if k != "original_max_position_embeddings"}}
    assert config_from_hf(llama.SPEC, no_original).rope_scaling["original_max_position_embeddings"] == 131072
    with pytest.raises(ConfigError, match="disagree"):
        config_from_hf(llama.SPEC, {**LLAMA_3_2_1B, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})


def test_defaults_follow_transformers():
    """Keys a config.json omits take transformers' class defaults (parity means same defaults)."""
    minimal = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 4}
    cfg = config_from_hf(llama.SPEC, minimal)
    assert (cfg.n_key_value_heads, cfg.d_head, cfg.rope_theta, cfg.rope_scaling) == (4, 8, 10000.0, None)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.n_ctx, cfg.norm_eps, cfg.tie_embeddings) == (1, 2, 2048, 1e-6, False)
    assert config_from_hf(llama.SPEC, {**minimal, "bos_token_id": None}).bos_token_id is None
    assert config_from_hf(llama.SPEC, {**minimal, "hidden_act": "swish"}).act_fn == "silu"


@pytest.mark.parametrize(
    "family, change, match",
    [
        (qwen2, {"hidden_act": "gelu"}, r"hidden_act='gelu'.*supported: silu"),
        (llama, {"hidden_act": "relu"}, r"hidden_act='relu'.*supported: silu"),
        (qwen2, {"use_sliding_window": True, "max_window_layers": 21},
         r"use_sliding_window=true with sliding_window=131072 on layers \[21, .*27\]"),
        (qwen2, {"use_sliding_window": True, "layer_types": ["full_attention"] * 27 + ["sliding_attention"]},
         r"on layers \[27\]"),
        (qwen2, {"layer_types": ["full_attention"] * 27 + ["chunked_attention"]}, r"layer_types"),
        (llama, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
         r"rope type 'yarn' is not supported; supported rope types: default, linear, llama3"),
        (llama, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope type 'dynamic'"),
        (qwen2, {"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, r"rope type 'su'"),
        (llama, {"rope_scaling": {"rope_type": "linear"}}, r"'linear' needs factor"),
        (llama, {"pretraining_tp": 2}, r"pretraining_tp=2 .*supported: 1"),
        (llama, {"attention_dropout": 0.1}, r"attention_dropout=0.1 .*inference"),
        (llama, {"rope_interleaved": True}, r"rope_interleaved=True"),
        (qwen2, {"use_mrope": True}, r"use_mrope=True .*multimodal"),
        (llama, {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
        (llama, {"quantization_config": {"quant_method": "gptq", "bits": 4}}, r"quantization_config \(gptq\)"),
        (llama, {"num_hidden_layers": None}, r"lacks num_hidden_layers"),
        (llama, {"num_attention_heads": 5}, r"n_heads=5 is not a multiple of n_key_value_heads=8"),
    ],
)
def test_unsupported_settings_are_refused(family, change, match):
    base = QWEN2_1_5B if family is qwen2 else LLAMA_3_2_1B
    with pytest.raises(ConfigError, match=match):
        config_from_hf(family.SPEC, {**base, **change}, strict=False)  # strict=False relaxes none of these


def test_sliding_window_that_never_applies_is_accepted():
    cfg = {**QWEN2_1_5B, "use_sliding_window": True, "max_window_layers": 28}  # window starts past the last layer
    assert config_from_hf(qwen2.SPEC, cfg).n_layers == 28


def test_unknown_keys_listed_then_warned_with_strict_false():
    cfg = {**LLAMA_3_2_1B, "num_experts": 8, "qk_layernorm": True, "use_bfloat16": False}
    with pytest.raises(ConfigError, match=r"keys hookedcot does not know .*: num_experts, qk_layernorm\. .*strict=False"):
        config_from_hf(llama.SPEC, cfg)
    with pytest.warns(UnknownConfigKeysWarning, match="num_experts, qk_layernorm"):
        assert config_from_hf(llama.SPEC, cfg, strict=False).n_layers == 16
    with pytest.raises(ConfigError, match=r"rope settings .*: beta_fast"):
        config_from_hf(llama.SPEC, {**LLAMA_3_2_1B, "rope_scaling": {**_LLAMA3_ROPE, "beta_fast": 32}})
    with pytest.raises(ConfigError, match=r"attention_bias"):  # a llama key means nothing to Qwen2's code
        config_from_hf(qwen2.SPEC, {**QWEN2_1_5B, "attention_bias": False})


def test_foreign_architecture_and_model_type():
    with pytest.raises(ConfigError, match=r"Qwen2ForSequenceClassification.*Qwen2ForCausalLM"):
        config_from_hf(qwen2.SPEC, {**QWEN2_1_5B, "architectures": ["Qwen2ForSequenceClassification"]})
    with pytest.raises(ConfigError, match="model_type='llama'"):
        config_from_hf(qwen2.SPEC, LLAMA_3_2_1B)
    with pytest.raises(ConversionError, match=r"model_type='mistral' .*supported model types: llama, qwen2"):
        family_for("mistral")


def test_keys_transformers_writes_for_a_gguf_loaded_model_load_strictly(tiny_checkpoints, tmp_path):
    """A folder saved by transformers after loading a GGUF file carries these keys."""
    import json
    import shutil

    from hookedcot import HookedCoT

    folder = tmp_path / "from_gguf"
    shutil.copytree(tiny_checkpoints["smollm2_like"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(unk_token_id=0, _model_name_or_path="SmolLM2-135M-Instruct.Q4_1.gguf")
    (folder / "config.json").write_text(json.dumps(cfg))
    assert HookedCoT.from_pretrained(folder).cfg.n_layers == cfg["num_hidden_layers"]
