"""HuggingFace folders -> ConvertedCheckpoint: pick the family, translate, name the tensors, defer reads.

`convert_hf_folder` reads config.json and the safetensors headers only: the config translates (or
says exactly which field is unsupported) and every weight is a float type. Which parameters the
model has, and their shapes, `hookedcot.loading` checks against the meta-device model before any
weight is read. What it returns holds `TensorRef`s whose `load(dtype)` reads one tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hookedcot.conversions import (
    ConversionError, ConvertedCheckpoint, SourceFormat, TensorNames, TensorRef, check_layer_count, check_tokenizer_fits,
    read_json_file,
)
from hookedcot.conversions import llama, qwen2
from hookedcot.conversions.hf_config import FamilySpec, config_from_hf
from hookedcot.conversions.safetensors_io import SafetensorsCheckpoint, TensorInfo
from hookedcot.config import ModelConfig

# model_type (config.json) -> the family's config spec
FAMILIES: dict[str, FamilySpec] = {"qwen2": qwen2.SPEC, "llama": llama.SPEC}

# architectures -> model_type, for configs that omit model_type
_ARCHITECTURES = {arch: mt for mt, spec in FAMILIES.items() for arch in spec.architectures}

# Buffers older transformers saved next to the weights; recomputed from the config, never read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Qwen2 and LLaMA share transformers' LLaMA layout; conversion is a rename.
HF_NAMES = TensorNames(
    whole={"model.embed_tokens": "embed", "model.norm": "ln_final", "lm_head": "unembed"},
    layer="model.layers.{}",
    parts={
        "input_layernorm": "ln1",
        "post_attention_layernorm": "ln2",
        **{f"self_attn.{p}": f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{f"mlp.{p}": f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
    },
)


def _unexpected_hint(names: list[str], cfg: ModelConfig) -> str:
    if any(n.endswith(".bias") for n in names):
        return (
            f"the config implies qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}; "
            "check attention_bias / mlp_bias in config.json"
        )
    if "lm_head.weight" in names:
        return "check tie_word_embeddings in config.json"
    return ""


HF_FORMAT = SourceFormat(
    names=HF_NAMES,
    shapes_from="the config",
    fix="config.json and the weights must come from the same model; re-download the checkpoint folder",
    unexpected_hint=_unexpected_hint,
)


def family_for(model_type: str | None) -> FamilySpec:
    """The family spec for a config's model_type, or an error listing the ones we support."""
    spec = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise ConversionError(
            f"model_type={model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))} "
            "(Qwen2 / Qwen2.5 / R1-Distill-Qwen are 'qwen2'; LLaMA-3.x / SmolLM2 / R1-Distill-Llama are 'llama')"
        )
    return spec


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{folder} has no config.json; a HuggingFace checkpoint folder needs it next to its *.safetensors"
        )
    cfg = read_json_file(path)
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return cfg


def convert_hf_folder(path: str | Path, strict: bool = True) -> ConvertedCheckpoint:
    """A HuggingFace checkpoint folder (config.json + safetensors) -> ConvertedCheckpoint.

    Reads config.json and the safetensors headers only. Raises hookedcot.config.ConfigError for
    a configuration we do not implement and ConversionError for files or weights we cannot read;
    `strict=False` downgrades unknown config keys to a warning, nothing else."""
    folder = Path(path).expanduser()
    hf_cfg = read_hf_config(folder)
    model_type = hf_cfg.get("model_type")
    if model_type is None:  # very old configs; fall back to the architecture name
        archs = hf_cfg.get("architectures")
        archs = archs if isinstance(archs, list) else []
        model_type = next((_ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in _ARCHITECTURES), None)
    cfg = config_from_hf(family_for(model_type), hf_cfg, strict=strict, source=str(folder))
    checkpoint = SafetensorsCheckpoint.from_folder(folder)
    check_layer_count(cfg, checkpoint.infos, HF_NAMES, "num_hidden_layers", folder)
    infos, unmapped = _name_tensors(checkpoint.infos, cfg, folder)

    def reader(name: str):
        return lambda dtype: checkpoint.read(name, dtype)

    return ConvertedCheckpoint(
        config=cfg,
        tensors={ours: TensorRef(i.name, i.shape, reader(i.name), i.file.name) for ours, i in infos.items()},
        format=HF_FORMAT,
        unmapped=unmapped,
        tokenizer=_folder_tokenizer(folder, cfg),
        source_dtype=_majority_dtype(infos.values()),
    )


def _folder_tokenizer(folder: Path, cfg: ModelConfig):
    """The folder's tokenizer, or None when it has no tokenizer.json (the weights load without one).

    A tokenizer.json that is there but cannot be read, or whose ids run past the embedding, is an
    error: dropping it silently would leave a model that cannot turn text into the right ids."""
    from hookedcot.tokenizer import Tokenizer, TokenizerError

    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        tokenizer = Tokenizer.from_hf_folder(folder)
    except TokenizerError as exc:
        raise ConversionError(f"{folder}: the tokenizer files cannot be used: {exc}") from exc
    check_tokenizer_fits(tokenizer, cfg, str(folder))
    return tokenizer


def _name_tensors(infos: dict[str, TensorInfo], cfg: ModelConfig, folder: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Our name -> the checkpoint tensor behind it, and the tensors no rule names; every weight
    that is not a float type reported at once."""
    named: dict[str, TensorInfo] = {}
    unmapped: list[str] = []
    bad: list[str] = []
    for name, info in infos.items():
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # tied: lm_head is a redundant copy of the embedding
        ours = HF_NAMES.ours(name)
        if ours is None:
            unmapped.append(name)
        elif info.dtype not in _FLOAT_DTYPES:
            bad.append(f"{name} is stored as {info.header_dtype} in {info.file.name}")
        else:
            named[ours] = info
    if bad:
        raise ConversionError(
            f"{folder}: {_names(bad)}; only float16/bfloat16/float32/float64 weights are supported (quantized "
            "safetensors are not; use the original weights or a GGUF)"
        )
    return named, unmapped


def _majority_dtype(infos) -> torch.dtype | None:
    """The dtype most of the weights are stored in (a few checkpoints keep norms in float32)."""
    counts: dict[torch.dtype, int] = {}
    for info in infos:
        counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.__getitem__, default=None)


def _names(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
