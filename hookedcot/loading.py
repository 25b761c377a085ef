"""from_pretrained: resolve a name to a source, convert it, fill a meta-device model in place.

Source -> `hookedcot.conversions` (config + named tensor refs) -> a model built on the meta
device, whose parameters the refs are checked against before any data is read -> each parameter
replaced by its tensor, read from the source in the target dtype. Peak memory is about one copy
of the weights; a failed load leaves nothing.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hookedcot.conversions import CheckpointNotFoundError, ConversionError, ConvertedCheckpoint, check_finite
from hookedcot.embedded import EMBEDDED_HUB_IDS
from hookedcot.inputs import InputError
from hookedcot.rope import inv_freq

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or a torch.dtype")
    return _DTYPES[key]


def convert_source(name_or_path: str | Path, strict_config: bool = True, revision: str | None = None) -> ConvertedCheckpoint:
    """Turn a GGUF file, an HF folder, an embedded model's name or a hub id into a checkpoint."""
    from hookedcot.conversions.gguf import convert_gguf
    from hookedcot.conversions.registry import convert_hf_folder
    from hookedcot.embedded import embedded_model_path, is_embedded_name

    name = str(name_or_path)
    if is_embedded_name(name):
        return convert_gguf(embedded_model_path(name))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConversionError(
                f"{path} is a file but not a .gguf file; pass a GGUF file or a checkpoint folder "
                "(config.json + *.safetensors)"
            )
        return convert_gguf(path)
    if path.is_dir():
        return convert_hf_folder(path, strict=strict_config)
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointNotFoundError(
            f"{name!r} is neither an existing file or folder, nor a hub id like 'Qwen/Qwen2-1.5B', "
            "nor an embedded model ('smollm2-135m-instruct')"
        )
    return convert_hf_folder(download_from_hub(name, revision), strict=strict_config)


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Resolve a hub id through huggingface_hub (its cache and HF_HUB_OFFLINE are honoured)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # connection refused, offline and not cached, gated, not found ...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise ConversionError(
            f"could not get {repo_id!r} from the HuggingFace hub"
            + (" (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else "")
            + f": {type(exc).__name__}: {exc}\n"
            "Download the checkpoint where the hub is reachable (e.g. `huggingface-cli download "
            f"{repo_id} --local-dir ./{repo_id.split('/')[-1]}`) and pass that folder: "
            f"HookedCoT.from_pretrained('./{repo_id.split('/')[-1]}')"
        ) from exc


# TransformerLens' weight processing: hookedcot never folds or centres weights, so these change nothing.
WEIGHT_PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                           "refactor_factored_attn_matrices")
# TransformerLens' loading options that have no meaning here (one device, our own tokenizer setup).
_IGNORED_TL_OPTIONS = ("move_to_device", "n_devices", "first_n_layers", "fold_value_bias", "checkpoint_index",
                       "checkpoint_value", "n_ctx")


def load_pretrained(
    cls: type,
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    strict_config: bool = True,
    revision: str | None = None,
    requires_grad: bool = True,
    default_prepend_bos: bool | None = None,
    default_padding_side: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    **tl_options: Any,
) -> Any:
    """`requires_grad` (default True, as in TransformerLens and transformers) lets
    `model(tokens).sum().backward()` work; it costs nothing under `torch.no_grad()` /
    `torch.inference_mode()`, which every hookedcot tool and `generate` use.
    `device_map` ("auto" or {module: device}, see device_map.py) places the model over devices,
    each tensor read straight to its own; it replaces `device`."""
    unknown = sorted(set(tl_options) - set(WEIGHT_PROCESSING_FLAGS) - set(_IGNORED_TL_OPTIONS))
    if unknown:
        raise TypeError(
            f"from_pretrained got unknown options {unknown}; it takes dtype, device, strict_config, revision, "
            f"requires_grad, default_prepend_bos, default_padding_side and TransformerLens' {', '.join(WEIGHT_PROCESSING_FLAGS)}"
        )
    asked = [flag for flag in WEIGHT_PROCESSING_FLAGS if tl_options.get(flag)]
    if asked:
        warnings.warn(
            f"{', '.join(asked)}: hookedcot never folds or centres weights (its logits equal transformers'), so these "
            "options change nothing; cache.apply_ln_to_stack applies the norm's weight itself. "
            "HookedCoT.from_pretrained_no_processing says the same without this warning.",
            stacklevel=3,
        )
    if default_padding_side not in (None, "left", "right"):
        raise InputError(f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}")
    if dtype is not None and torch_dtype is not None:
        raise InputError("pass dtype or torch_dtype, not both")
    if device_map is not None and device is not None:
        raise InputError("pass device or device_map, not both: a device_map names each module's device")
    target_dtype = parse_dtype(dtype if dtype is not None else torch_dtype)
    converted = convert_source(name_or_path, strict_config=strict_config, revision=revision)
    target_dtype = target_dtype or _default_dtype(converted.source_dtype)
    model = build_model(cls, converted, target_dtype, torch.device(device or "cpu"), requires_grad=requires_grad,
                        device_map=device_map)
    tokenizer = model.tokenizer
    if tokenizer is not None and hasattr(tokenizer, "name_or_path"):  # HF's field: the hub id, folder or file
        tokenizer.name_or_path = EMBEDDED_HUB_IDS.get(str(name_or_path).lower(), str(name_or_path))
    if tokenizer is not None and default_prepend_bos is not None:
        tokenizer.add_bos = bool(default_prepend_bos)
    if tokenizer is not None and default_padding_side is not None:
        tokenizer.padding_side = default_padding_side
    prepend = bool(getattr(tokenizer, "add_bos", True)) if default_prepend_bos is None else bool(default_prepend_bos)
    model.cfg = model.cfg.replace(default_prepend_bos=prepend)
    return model


def _default_dtype(source: torch.dtype | None) -> torch.dtype:
    """The checkpoint's own float dtype (like transformers' dtype='auto'); float32 for GGUF."""
    return source if source in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def build_model(
    cls: type, converted: ConvertedCheckpoint, dtype: torch.dtype, device: torch.device, requires_grad: bool = True,
    device_map: Any = None,
) -> Any:
    """Create the model on the meta device, check the checkpoint against its parameters, and
    stream each tensor into place (with a `device_map`, each to its module's device: host memory
    holds one tensor at a time on its way to a GPU)."""
    cfg = converted.config
    with torch.device("meta"):
        model = cls(cfg, tokenizer=converted.tokenizer)
    check_tensors(converted, {name: tuple(p.shape) for name, p in model.named_parameters()})
    placement = None
    if device_map is not None:
        from hookedcot.device_map import resolve_device_map

        elem = torch.finfo(dtype).bits // 8
        placement = resolve_device_map(device_map, cfg, {n: p.numel() * elem for n, p in model.named_parameters()})
        device = placement.embed
    for name, ref in converted.tensors.items():
        target = placement.device_of(name) if placement is not None else device
        tensor = ref.load(dtype).to(device=target, dtype=dtype)
        if not tensor.is_meta:  # a module mapped to "meta" (device_map) holds no data to check
            check_finite(tensor, ref.source_name, cfg.source or cfg.model_name)
        module_name, attr = name.rsplit(".", 1)
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad)
    if cfg.tie_embeddings:
        model.unembed.weight = model.embed.weight
    model.inv_freq = inv_freq(cfg.d_head, cfg.rope_theta, cfg.rope_scaling).to(device)
    model.placement = placement if placement is not None and placement.is_split else None
    model.cfg = model.cfg.replace(device=str(model.embed.weight.device))
    return model.eval()


def check_tensors(converted: ConvertedCheckpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """The one check of a checkpoint's tensors against the parameters the model has (`expected`,
    from the meta-device model): missing, unexpected and mis-shaped tensors, all reported at once
    in the source's own names, before any data is read."""
    cfg, fmt, got = converted.config, converted.format, converted.tensors
    problems = []
    unexpected = converted.unmapped + [ref.source_name for name, ref in got.items() if name not in expected]
    if unexpected:
        hint = fmt.unexpected_hint(unexpected, cfg)
        problems.append(f"unexpected tensors{f' ({hint})' if hint else ''}: {_names(unexpected)}")
    missing = [f"{fmt.names.source(name)} (-> {name})" for name in expected if name not in got]
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    for name, shape in expected.items():
        ref = got.get(name)
        if ref is not None and tuple(ref.shape) != shape:
            where = f" in {ref.file}" if ref.file else ""
            problems.append(
                f"{ref.source_name} (-> {name}) has shape {list(ref.shape)}{where}, but {fmt.shapes_from} implies {list(shape)}"
            )
    if problems:
        raise ConversionError(
            f"{cfg.source or cfg.model_name} does not match {fmt.shapes_from} ({cfg.family}, {cfg.n_layers} layers, "
            f"d_model={cfg.d_model}): " + "; ".join([*problems, fmt.fix])
        )


def _names(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
