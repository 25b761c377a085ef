"""Qwen2 family: Qwen2, Qwen2.5 (incl. Qwen2.5-Math) and DeepSeek-R1-Distill-Qwen.

Quirks, as transformers' Qwen2 implements them: q/k/v projections always carry a bias and o_proj
never does (no config switch), rope_theta is 1e6 for Qwen2/Qwen2.5 and 1e4 for Qwen2.5-Math and
R1-Distill-Qwen, small models tie their embeddings. Sliding-window attention exists in the config
but is off in every released checkpoint; we implement full attention only and refuse a config
that switches the window on. The tensor layout is LLaMA's, so conversion is a rename.
"""

from __future__ import annotations

from typing import Any

from hookedcot.conversions.hf_config import FamilySpec
from hookedcot.config import ConfigError

_DEFAULTS: dict[str, Any] = {  # transformers' Qwen2Config defaults, for keys a config.json omits
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}


def _check_sliding_window(cfg: dict[str, Any]) -> None:
    """Reject a window that transformers would actually apply: `use_sliding_window` on and some
    layer typed (or, without `layer_types`, indexed at or past `max_window_layers`) as sliding."""
    n_layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        odd = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if odd or len(layer_types) != n_layers:
            raise ConfigError(
                f"layer_types={layer_types!r}: expected {n_layers} entries of 'full_attention' "
                "(or 'sliding_attention', which is not implemented)"
            )
    use = cfg.get("use_sliding_window", _DEFAULTS["use_sliding_window"])
    window = cfg.get("sliding_window", _DEFAULTS["sliding_window"])
    if not use or window is None:
        return  # transformers sets sliding_window=None, so every layer attends fully
    if layer_types is not None:
        sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    else:
        first = cfg.get("max_window_layers", _DEFAULTS["max_window_layers"])
        sliding = range(first, n_layers)  # not a list: n_layers comes from the file
    if sliding:
        raise ConfigError(
            f"use_sliding_window=true with sliding_window={window} on layers {_layers(sliding)}: sliding-window "
            "attention is not implemented (supported: full attention, use_sliding_window=false). For "
            f"sequences no longer than {window} tokens the two are identical; set use_sliding_window to "
            "false in config.json if that is your case."
        )


SPEC = FamilySpec(
    family="qwen2",
    model_type="qwen2",
    architectures=("Qwen2ForCausalLM",),
    defaults=_DEFAULTS,
    family_keys=frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}),
    pinned={"use_mrope": ((False,), "multimodal rope (Qwen2-VL) is not implemented")},
    check=_check_sliding_window,
    biases=lambda cfg: {"qkv_bias": True, "o_bias": False, "mlp_bias": False},
)


def _layers(indices: Any) -> str:
    """`[21, 22, ..., 27]`-style listing that never materialises a huge range."""
    shown = [str(i) for i in indices[:8]]
    return "[" + ", ".join(shown + (["...", str(indices[-1])] if len(indices) > 8 else [])) + "]"
