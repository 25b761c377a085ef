"""GGUF metadata -> ModelConfig: llama.cpp's key names translated, and LLaMA-3.1 rope scaling
recovered from the `rope_freqs` tensor (llama.cpp stores it as per-frequency divisors, not as
metadata). The tensors themselves are read in `gguf.py`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hookedcot.conversions import ConversionError
from hookedcot.config import ConfigError, ModelConfig


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field as a plain Python value (str, int, float, bool or list)."""
    meta = {}
    for key, field in reader.fields.items():
        value = field.contents()
        meta[key] = value.item() if isinstance(value, np.generic) else value
    return meta


def config_from_gguf(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str = "", rope_freqs: np.ndarray | None = None
) -> ModelConfig:
    """Translate llama.cpp's metadata keys into a ModelConfig. `shapes` maps each tensor name to its
    torch-order shape: the biases, the tying and the vocabulary size are read off the tensors (GGUF
    has no key for the first two, and `vocab_size` is optional)."""
    arch = meta["general.architecture"]
    token_ids = {k: meta[k] for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                       "tokenizer.ggml.eom_token_id", "tokenizer.ggml.padding_token_id") if k in meta}
    bad = {k: v for k, v in token_ids.items() if isinstance(v, bool) or not isinstance(v, int)}
    if bad:
        raise ConversionError(f"{source}: token ids must be integers; got {bad!r:.200}")

    def key(name: str, default: Any = ..., kind: Callable = int) -> Any:
        full = f"{arch}.{name}"
        if full not in meta:
            if default is ...:
                missing.append(full)
                return None
            return default
        value = meta[full]
        if isinstance(value, list):
            if not value or any(v != value[0] for v in value):
                raise ConversionError(f"{source}: {full} varies per layer ({value!r:.200}); hookedcot needs one value")
            value = value[0]
        # no coercion: int(2.7), int(True) or float("1e-5") would turn a corrupt value into a plausible one
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ConversionError(f"{source}: {full}={value!r:.80} is not {'a number' if kind is float else 'an integer'}")
        return kind(value)

    missing: list[str] = []
    d_model = key("embedding_length")
    n_heads = key("attention.head_count")
    n_layers = key("block_count")
    d_mlp = key("feed_forward_length")
    eps = key("attention.layer_norm_rms_epsilon", kind=float)
    if missing:
        raise ConversionError(f"{source}: the GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
    if n_heads <= 0 or d_model <= 0:  # divided by below; the other sizes ModelConfig checks
        raise ConversionError(f"{source}: {arch}.attention.head_count={n_heads}, embedding_length={d_model}; both must be positive")
    n_kv = key("attention.head_count_kv", n_heads)
    d_head = key("attention.key_length", d_model // n_heads)
    rotary = key("rope.dimension_count", d_head)
    if rotary != d_head or key("attention.value_length", d_head) != d_head:
        raise ConversionError(
            f"{source}: rotary dimension {rotary} / value length {key('attention.value_length', d_head)} differ from the "
            f"head dimension {d_head}; partial rotary and asymmetric heads are not supported"
        )
    if "token_embd.weight" not in shapes:
        raise ConversionError(f"{source}: the GGUF has no token_embd.weight tensor")
    theta = key("rope.freq_base", 10000.0, float)
    n_ctx = key("context_length", 4096)
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    eos = list(dict.fromkeys(eos))
    layer_has = lambda part: any(n.endswith(part) for n in shapes)  # noqa: E731
    try:
        rope_scaling = _rope_scaling(meta, arch, rope_freqs, d_head, theta, source)
    except (ArithmeticError, ValueError) as exc:  # a fit over corrupt rope_freqs (numpy's LinAlgError is a ValueError)
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"{source}: the rope_freqs tensor is corrupt ({type(exc).__name__}: {exc})") from exc
    try:
        return ModelConfig(
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_key_value_heads=n_kv,
            d_head=d_head,
            d_mlp=d_mlp,
            d_vocab=shapes["token_embd.weight"][0],
            n_ctx=n_ctx,
            norm_eps=eps,
            rope_theta=theta,
            rope_scaling=rope_scaling,
            qkv_bias=layer_has(".attn_q.bias"),
            o_bias=layer_has(".attn_output.bias"),
            mlp_bias=layer_has(".ffn_up.bias"),
            tie_embeddings="output.weight" not in shapes,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            model_name=str(meta.get("general.name") or Path(source).stem or "gguf"),
            family=arch,
            source=source,
        )
    except ConfigError as exc:
        raise ConversionError(f"{source}: {exc}") from exc


def _rope_scaling(
    meta: dict[str, Any], arch: str, rope_freqs: np.ndarray | None, d_head: int, theta: float, source: str
) -> dict[str, Any] | None:
    """llama.cpp's rope scaling keys (or its rope_freqs tensor) -> hookedcot's rope_scaling dict."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", 0.0) or 0.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (kind is None or isinstance(kind, str)):
        raise ConversionError(f"{source}: rope.scaling.type={kind!r:.40} / factor={factor!r:.40} must be a string and a number")
    factor = float(factor)
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise ConversionError(f"{source}: both rope.scaling.type={kind!r} and a rope_freqs tensor; ambiguous rope scaling")
        return llama3_scaling_from_rope_freqs(rope_freqs, d_head, theta, source)
    if kind in (None, "linear") and factor not in (0.0, 1.0):
        return {"rope_type": "linear", "factor": factor}  # llama.cpp reads a bare factor as linear too
    if kind in (None, "none", "linear"):
        return None
    raise ConversionError(
        f"{source}: rope scaling {kind!r} (factor {factor}) is not implemented; hookedcot supports linear and "
        "llama3 (rope_freqs) scaling. Use a file converted without long-context rope scaling."
    )


def llama3_scaling_from_rope_freqs(freqs: np.ndarray, d_head: int, theta: float, source: str = "") -> dict[str, Any] | None:
    """Recover LLaMA-3.1 scaling parameters from llama.cpp's per-frequency divisors.

    llama.cpp stores `factor` for long wavelengths, 1 for short ones and a blend between. The blend
    is linear in 1/wavelength, which pins `original_max_position_embeddings / (high - low)` and
    `low / (high - low)`; any common scale of (original, low, high) gives the same rotation, so we
    fix low_freq_factor = 1 (Meta's value). The result is checked against the tensor."""
    from hookedcot.rope import inv_freq

    freqs = np.asarray(freqs, dtype=np.float64)
    if freqs.shape != (d_head // 2,):
        raise ConversionError(f"{source}: rope_freqs has {freqs.size} entries; expected d_head/2 = {d_head // 2}")
    if np.allclose(freqs, 1.0):
        return None
    factor = round(float(freqs.max()), 4)
    base = 1.0 / theta ** (np.arange(0, d_head, 2, dtype=np.float64) / d_head)
    inv_wavelen = base / (2 * math.pi)
    blend = (freqs > 1 + 1e-6) & (freqs < factor - 1e-6)
    candidates = [(1.0, 4.0, 8192)]  # Meta's LLaMA-3.1 / 3.2 values, and llama.cpp's defaults
    if blend.sum() >= 2:
        smooth = (1 / freqs[blend] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_wavelen[blend], smooth, 1)  # smooth = old/(h-l) * x - l/(h-l)
        if intercept < 0:
            high = 1.0 - 1.0 / float(intercept)
            candidates.insert(0, (1.0, round(high, 4), int(round(float(slope) * (high - 1.0)))))
    target = base / freqs
    for low, high, original in candidates:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
        ours = inv_freq(d_head, theta, scaling).double().numpy()
        if np.allclose(ours, target, rtol=1e-5, atol=0):
            return scaling
    raise ConversionError(
        f"{source}: the rope_freqs tensor does not match LLaMA-3.1-style (llama3) rope scaling for any parameters we "
        "could recover; this rope scaling is not supported"
    )
