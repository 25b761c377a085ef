"""Translation of a HuggingFace `config.json` into a ModelConfig, shared by the families.

Every key of the source config is accounted for: it is either read (it changes the math), known
to be harmless (bookkeeping, generation defaults, training-only settings), required to hold the
one value we implement (`pretraining_tp: 1`, `rope_interleaved: false`, ...), or unknown. Unknown
keys raise a ConfigError listing them, because a key we do not understand may change the forward
pass and a silent mismatch with transformers is the worst failure an interpretability tool can
have. `strict=False` turns that one check (and the `architectures` check) into a warning;
everything we know we do not implement always raises.

Rope settings come in two spellings: transformers 5 writes `rope_parameters` ({"rope_type",
"rope_theta", scaling keys}); older configs write `rope_theta` plus `rope_scaling` (with "type" or
"rope_type"). Both are read, with the same precedence and defaults as transformers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hookedcot.config import SUPPORTED_ACTIVATIONS, ConfigError, ModelConfig
from hookedcot.rope import ROPE_TYPES

# Keys that never change the forward pass of a decoder LM at inference time.
HARMLESS_KEYS = frozenset(
    """
    architectures model_type transformers_version torch_dtype dtype use_cache initializer_range
    _name_or_path _commit_hash _attn_implementation _attn_implementation_autoset attn_implementation
    output_attentions output_hidden_states return_dict torchscript use_bfloat16 tf_legacy_loss
    is_decoder is_encoder_decoder add_cross_attention cross_attention_hidden_size tie_encoder_decoder
    chunk_size_feed_forward finetuning_task id2label label2id num_labels problem_type tokenizer_class
    prefix task_specific_params sep_token_id decoder_start_token_id unk_token_id cls_token_id mask_token_id
    _model_name_or_path
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p epsilon_cutoff eta_cutoff repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    """.split()
)

# Keys whose value must be exactly what hookedcot implements: key -> (allowed values, why).
PINNED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "pruned_heads": (({},), "pruned attention heads are not implemented"),
    "partial_rotary_factor": ((1.0, None), "partial rotary embeddings are not implemented"),
    "attention_dropout": ((0.0, 0, None), "hookedcot runs inference only; set it to 0.0"),
}

_ROPE_BASE_KEYS = frozenset({"rope_type", "type", "rope_theta"})
DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


class UnknownConfigKeysWarning(UserWarning):
    """config.json has keys hookedcot does not know; raised as an error unless strict=False."""


@dataclass(frozen=True)
class FamilySpec:
    """What distinguishes one HuggingFace family's config from another: data, not code paths.

    `defaults` are the values transformers' config class uses when a key is absent (parity means
    the same defaults); `family_keys` are the harmless or separately-checked keys of this family;
    `check` validates family-specific settings (Qwen2's sliding window) and `biases` reads the
    bias switches (Qwen2 hard-codes them, LLaMA reads `attention_bias` / `mlp_bias`).
    """

    family: str
    model_type: str
    architectures: tuple[str, ...]
    defaults: dict[str, Any]
    family_keys: frozenset[str]
    pinned: dict[str, tuple[tuple[Any, ...], str]] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] = lambda cfg: None
    biases: Callable[[dict[str, Any]], dict[str, bool]] = lambda cfg: {}


# Keys read by `config_from_hf` for every family.
_READ_KEYS = frozenset(
    """
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads
    head_dim hidden_act max_position_embeddings rms_norm_eps tie_word_embeddings
    rope_theta rope_scaling rope_parameters bos_token_id eos_token_id pad_token_id quantization_config
    """.split()
)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_from_hf(spec: FamilySpec, cfg: dict[str, Any], *, strict: bool = True, source: str = "") -> ModelConfig:
    """A HuggingFace config dict -> ModelConfig for the family `spec` describes, rejecting whatever
    we do not implement."""
    where = f" in {source}" if source else ""
    quantization = cfg.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method", "unknown method") if isinstance(quantization, dict) else quantization
        raise ConfigError(
            f"quantization_config ({method}){where}: quantized checkpoints are not supported; load the "
            "original (unquantized) weights, or a GGUF file, which hookedcot dequantises"
        )
    model_type = cfg.get("model_type", spec.model_type)
    if model_type != spec.model_type:
        raise ConfigError(f"model_type={model_type!r}{where}, but the {spec.family} family reads {spec.model_type!r}")
    _check_types(cfg, where)
    _check_keys(cfg, spec, strict, where)
    _check_pinned(cfg, {**PINNED_VALUES, **spec.pinned}, where)
    missing = [key for key in _REQUIRED if cfg.get(key) is None]
    if missing:
        raise ConfigError(f"config{where} lacks {', '.join(missing)}; these have no safe default")
    spec.check(cfg)

    get = lambda key: cfg[key] if cfg.get(key) is not None else spec.defaults.get(key)  # noqa: E731
    token = lambda key: cfg[key] if key in cfg else spec.defaults.get(key)  # noqa: E731  (null stays null)
    n_heads = cfg["num_attention_heads"]
    n_kv, d_head = get("num_key_value_heads"), get("head_dim")
    act = get("hidden_act")
    if act == "swish":  # transformers' ACT2FN maps "swish" to the same SiLU
        act = "silu"
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"hidden_act={act!r}{where} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)} "
            "(the gated MLP of Qwen2/LLaMA uses silu)"
        )
    rope_theta, rope_scaling = rope_from_hf(cfg, get("max_position_embeddings"), strict=strict, where=where)
    try:
        return ModelConfig(
            n_layers=cfg["num_hidden_layers"],
            d_model=cfg["hidden_size"],
            n_heads=n_heads,
            n_key_value_heads=n_heads if n_kv is None else n_kv,
            d_head=cfg["hidden_size"] // n_heads if d_head is None else d_head,
            d_mlp=cfg["intermediate_size"],
            d_vocab=cfg["vocab_size"],
            n_ctx=get("max_position_embeddings"),
            norm_eps=float(get("rms_norm_eps")),  # a number: _check_types
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_embeddings=get("tie_word_embeddings"),  # a bool: _check_types (bool("false") would be True)
            act_fn=act,
            bos_token_id=token("bos_token_id"),
            eos_token_id=token("eos_token_id"),
            pad_token_id=token("pad_token_id"),
            model_name=_model_name(cfg, source),
            family=spec.family,
            source=source,
            **spec.biases(cfg),
        )
    except ConfigError as exc:  # ModelConfig's range checks speak its own field names: give config.json's too
        named = [f"{ours} is {theirs}" for ours, theirs in _HF_KEY.items() if f"{ours}=" in str(exc)]
        raise ConfigError(f"config{where}: {exc}" + (f" (in config.json: {', '.join(named)})" if named else "")) from exc


_HF_KEY = {"n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
           "n_key_value_heads": "num_key_value_heads", "d_head": "head_dim", "d_mlp": "intermediate_size",
           "d_vocab": "vocab_size", "n_ctx": "max_position_embeddings", "norm_eps": "rms_norm_eps",
           "tie_embeddings": "tie_word_embeddings"}


def rope_from_hf(
    cfg: dict[str, Any], max_position_embeddings: int, *, strict: bool = True, where: str = ""
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling; rope_scaling is None for plain rotary.

    Precedence follows transformers: `rope_scaling` if set, else `rope_parameters`; rope_theta from
    the rope dict, else the top-level key, else 10000. llama3/yarn/longrope take
    `original_max_position_embeddings` from max_position_embeddings when it is absent."""
    scaling, params = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if scaling and params and _normalise_rope(scaling) != _normalise_rope(params):
        raise ConfigError(
            f"config{where} has both rope_scaling={scaling} and rope_parameters={params} and they disagree; "
            "keep one of them"
        )
    rope = dict(scaling or params or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(
            f"rope_parameters{where} look per-layer-type ({sorted(rope)}); one rope for all layers is supported"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str):
        raise ConfigError(f"rope type {rope_type!r}{where} must be a string; supported: {', '.join(sorted(ROPE_TYPES))}")
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None and not _is_number(theta):
        raise ConfigError(f"rope_theta={theta!r}{where} must be a number")
    theta = float(theta if theta is not None else DEFAULT_ROPE_THETA)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"rope type {rope_type!r}{where} is not supported; supported rope types: {', '.join(sorted(ROPE_TYPES))}"
        )
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial not in (1.0, None):
        raise ConfigError(f"rope partial_rotary_factor={partial}{where}: partial rotary embeddings are not implemented")
    needed = ROPE_TYPES[rope_type][1]
    if "original_max_position_embeddings" in needed:
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    unknown = sorted(set(rope) - _ROPE_BASE_KEYS - set(needed) - {"partial_rotary_factor"})
    if unknown:
        _complain(
            f"rope settings{where} have keys hookedcot does not read for rope type {rope_type!r}: "
            f"{', '.join(unknown)} (read: {', '.join(sorted(needed)) or 'none besides rope_theta'})",
            strict,
        )
    missing = [key for key in needed if rope.get(key) is None]
    if missing:
        raise ConfigError(f"rope type {rope_type!r}{where} needs {', '.join(missing)}")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **{key: rope[key] for key in needed}}


# The JSON type each key read (or checked) here must have; None is allowed where a default applies.
# Ranges (positive sizes, finite positive eps, ids inside the vocabulary, rope factors > 0) are
# ModelConfig's to check; types are checked first so that no arithmetic runs on a string or a bool.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "max_window_layers")
_NUMBERS = ("rms_norm_eps", "rope_theta")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "use_mrope")
_STRINGS = ("model_type", "hidden_act", "_name_or_path")
_DICTS = ("rope_scaling", "rope_parameters")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _check_types(cfg: dict[str, Any], where: str) -> None:
    """Every value hookedcot reads has the JSON type it must have; all wrong ones named at once."""
    wrong = []
    for key, value in cfg.items():
        if value is None:
            continue
        if key in _POSITIVE_INTS and not (_is_int(value) and value > 0):
            wrong.append(f"{key}={value!r} (a positive integer)")
        elif key in _NUMBERS and not _is_number(value):
            wrong.append(f"{key}={value!r} (a number)")
        elif key in _BOOLS and not isinstance(value, bool):
            wrong.append(f"{key}={value!r} (true or false)")
        elif key in _STRINGS and not isinstance(value, str):
            wrong.append(f"{key}={value!r} (a string)")
        elif key in _DICTS and not isinstance(value, dict):
            wrong.append(f"{key}={value!r} (an object)")
        elif key in ("architectures", "layer_types") and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            wrong.append(f"{key}={value!r} (a list of strings)")
        elif key in _TOKEN_IDS and not (
            _is_int(value) or (key == "eos_token_id" and isinstance(value, list) and all(map(_is_int, value)))
        ):
            wrong.append(f"{key}={value!r} (a token id{' or a list of ids' if key == 'eos_token_id' else ''})")
    if wrong:
        raise ConfigError(f"config{where} has values of the wrong type: {'; '.join(wrong)}; fix them in config.json")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalise_rope(rope: dict[str, Any]) -> dict[str, Any]:
    rope = dict(rope)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    rope.pop("rope_theta", None)  # compared separately: the top-level key may carry it
    return rope


def _check_keys(cfg: dict[str, Any], spec: FamilySpec, strict: bool, where: str) -> None:
    known = HARMLESS_KEYS | _READ_KEYS | PINNED_VALUES.keys() | spec.pinned.keys() | spec.family_keys
    unknown = sorted(key for key in cfg if key not in known and not key.startswith("transformers."))
    if unknown:
        _complain(
            f"config{where} has keys hookedcot does not know for model_type {spec.model_type!r}: "
            f"{', '.join(unknown)}. They may change the model's math, so hookedcot refuses to guess; "
            "if you know they are harmless, load with strict=False",
            strict,
        )
    archs = cfg.get("architectures") or []
    odd = [a for a in archs if a not in spec.architectures]
    if odd:
        _complain(
            f"architectures={archs}{where}: hookedcot's {spec.family} family implements "
            f"{', '.join(spec.architectures)} only (a different head would need different weights)",
            strict,
        )


def _check_pinned(cfg: dict[str, Any], pinned: dict[str, tuple[tuple[Any, ...], str]], where: str) -> None:
    for key, (allowed, why) in pinned.items():
        if key in cfg and cfg[key] not in allowed:
            shown = " or ".join(repr(a) for a in allowed if a is not None)
            raise ConfigError(f"{key}={cfg[key]!r}{where} is not supported ({why}); supported: {shown}")


def _complain(message: str, strict: bool) -> None:
    if strict:
        raise ConfigError(message)
    warnings.warn(message, UnknownConfigKeysWarning, stacklevel=4)


def _model_name(cfg: dict[str, Any], source: str) -> str:
    """"org/name" for a hub-cache snapshot folder, else `_name_or_path`, else the folder name."""
    path = Path(source) if source else None
    if path is not None and path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    name = cfg.get("_name_or_path") or ""
    if isinstance(name, str) and name and not name.startswith(("/", ".", "~")):
        return name
    return path.name if path is not None else "custom"

