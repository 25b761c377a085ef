"""HuggingFace folders -> ConvertedCheckpoint: pick the family, translate, validate, defer reads.

`convert_hf_folder` does every check that can fail before a single weight byte is read: the
config translates (or says exactly which field is unsupported), every parameter hookedcot expects
is present, nothing unexpected is there, every shape is the one the config implies and every
dtype is a float type. What it returns holds `TensorRef`s whose `load(dtype)` reads one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch

from hookedcot.conversions import ConversionError, ConvertedCheckpoint, TensorRef
from hookedcot.conversions import llama, qwen2
from hookedcot.conversions.safetensors_io import SafetensorsCheckpoint, TensorInfo
from hookedcot.config import ModelConfig

# model_type (config.json) -> family module with config_from_hf(cfg, strict, source) and tensor_table(cfg)
FAMILIES: dict[str, ModuleType] = {"qwen2": qwen2, "llama": llama}

# architectures -> model_type, for configs that omit model_type
_ARCHITECTURES = {arch: mt for mt, fam in FAMILIES.items() for arch in fam.SPEC.architectures}

# Buffers older transformers saved next to the weights; recomputed from the config, never read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def family_for(model_type: str | None) -> ModuleType:
    """The family module for a config's model_type, or an error listing the ones we support."""
    family = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise ConversionError(
            f"model_type={model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))} "
            "(Qwen2 / Qwen2.5 / R1-Distill-Qwen are 'qwen2'; LLaMA-3.x / SmolLM2 / R1-Distill-Llama are 'llama')"
        )
    return family


def expected_parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every hookedcot parameter a model with this config has, with its [out, in] shape."""
    d, v, m = cfg.d_model, cfg.d_vocab, cfg.d_mlp
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, d)}
    linears = {
        "attn.q_proj": ((q, d), cfg.qkv_bias),
        "attn.k_proj": ((kv, d), cfg.qkv_bias),
        "attn.v_proj": ((kv, d), cfg.qkv_bias),
        "attn.o_proj": ((d, q), cfg.o_bias),
        "mlp.gate_proj": ((m, d), cfg.mlp_bias),
        "mlp.up_proj": ((m, d), cfg.mlp_bias),
        "mlp.down_proj": ((d, m), cfg.mlp_bias),
    }
    for layer in range(cfg.n_layers):
        prefix = f"blocks.{layer}"
        shapes[f"{prefix}.ln1.weight"] = (d,)
        shapes[f"{prefix}.ln2.weight"] = (d,)
        for name, (shape, has_bias) in linears.items():
            shapes[f"{prefix}.{name}.weight"] = shape
            if has_bias:
                shapes[f"{prefix}.{name}.bias"] = (shape[0],)
    shapes["ln_final.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["unembed.weight"] = (v, d)
    return shapes


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{folder} has no config.json; a HuggingFace checkpoint folder needs it next to its *.safetensors"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return cfg


def convert_hf_folder(path: str | Path, strict: bool = True) -> ConvertedCheckpoint:
    """A HuggingFace checkpoint folder (config.json + safetensors) -> ConvertedCheckpoint.

    Reads config.json and the safetensors headers only. Raises hookedcot.config.ConfigError for
    a configuration we do not implement and ConversionError for files or tensors that do not
    fit; `strict=False` downgrades unknown config keys to a warning, nothing else."""
    folder = Path(path).expanduser()
    hf_cfg = read_hf_config(folder)
    model_type = hf_cfg.get("model_type")
    if model_type is None:  # very old configs; fall back to the architecture name
        model_type = next((_ARCHITECTURES[a] for a in hf_cfg.get("architectures") or [] if a in _ARCHITECTURES), None)
    family = family_for(model_type)
    cfg = family.config_from_hf(hf_cfg, strict=strict, source=str(folder))
    checkpoint = SafetensorsCheckpoint.from_folder(folder)
    table = family.tensor_table(cfg)
    infos = _validate(checkpoint.infos, table, cfg, folder)

    def reader(name: str):
        return lambda dtype: checkpoint.read(name, dtype)

    tensors = {ours: TensorRef(info.name, info.shape, reader(info.name)) for ours, info in infos.items()}
    tokenizer, tokenizer_error = _folder_tokenizer(folder)
    return ConvertedCheckpoint(
        config=cfg,
        tensors=tensors,
        tokenizer=tokenizer,
        source_dtype=_majority_dtype(infos.values()),
        extra={
            "format": "safetensors",
            "path": str(folder),
            "family": cfg.family,
            "hf_config": hf_cfg,
            "files": [str(f) for f in checkpoint.files],
            "tokenizer_error": tokenizer_error,
        },
    )


def _folder_tokenizer(folder: Path):
    """The folder's tokenizer, or None and the reason (the weights still load without one)."""
    from hookedcot.tokenizer import Tokenizer, TokenizerError

    if not (folder / "tokenizer.json").is_file():
        return None, f"{folder} has no tokenizer.json"
    try:
        return Tokenizer.from_hf_folder(folder), None
    except TokenizerError as exc:
        return None, str(exc)


def _validate(
    infos: dict[str, TensorInfo], table: dict[str, str], cfg: ModelConfig, folder: Path
) -> dict[str, TensorInfo]:
    """Our name -> the checkpoint tensor behind it; every mismatch reported at once, by name."""
    expected = expected_parameter_shapes(cfg)
    table_targets = set(table.values())
    if table_targets != set(expected):  # a family table out of step with the parameter list: our bug
        raise AssertionError(f"tensor table and expected parameters differ: {sorted(table_targets ^ set(expected))}")
    problems: list[str] = []
    unexpected = [
        name
        for name in infos
        if name not in table
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (name == "lm_head.weight" and cfg.tie_embeddings)  # tied: a redundant copy of embed
    ]
    if unexpected:
        hint = ""
        if any(n.endswith(".bias") for n in unexpected):
            hint = (
                f" (the config implies qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}; "
                "check attention_bias / mlp_bias in config.json)"
            )
        elif "lm_head.weight" in unexpected:
            hint = " (check tie_word_embeddings in config.json)"
        problems.append(f"unexpected tensors{hint}: {_names(unexpected)}")
    missing = [f"{hf} (-> {ours})" for hf, ours in table.items() if hf not in infos]
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    found: dict[str, TensorInfo] = {}
    for hf, ours in table.items():
        info = infos.get(hf)
        if info is None:
            continue
        if info.shape != expected[ours]:
            problems.append(
                f"{hf} (-> {ours}) has shape {list(info.shape)} in {info.file.name}, but the config implies "
                f"{list(expected[ours])}"
            )
        elif info.dtype not in _FLOAT_DTYPES:
            problems.append(
                f"{hf} is stored as {info.header_dtype} in {info.file.name}; only float16/bfloat16/float32/"
                "float64 weights are supported (quantized safetensors are not; use the original weights or a GGUF)"
            )
        found[ours] = info
    if problems:
        raise ConversionError(
            f"the checkpoint in {folder} does not match its config ({cfg.family}, {cfg.n_layers} layers, "
            f"d_model={cfg.d_model}): " + "; ".join(problems)
        )
    return found


def _majority_dtype(infos) -> torch.dtype:
    """The dtype most of the weights are stored in (a few checkpoints keep norms in float32)."""
    counts: dict[torch.dtype, int] = {}
    for info in infos:
        counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.__getitem__)


def _names(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
