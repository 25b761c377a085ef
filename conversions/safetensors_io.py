"""Streaming reads of HuggingFace safetensors checkpoints, single-file or sharded.

Why a module of its own: loading must (a) know every tensor's name, shape and dtype before any
weight is read, so that a wrong checkpoint fails in milliseconds instead of after minutes of
reading, and (b) read one tensor at a time so peak memory stays near one copy of the weights.
safetensors gives both: the header is a small JSON table, and the data is mmap'd and copied out
tensor by tensor.

We never unpickle (`pytorch_model.bin`, `*.pt`): pickle runs arbitrary code. A folder holding only
such files gets an error that says how to convert it once, outside hookedcot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from conversions import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype strings -> torch dtypes (getattr: older torch lacks some).
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
        "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    }.items()
    if hasattr(torch, attr)
}

_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "consolidated.00.pth")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor; no data has been read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a header dtype torch has no type for
    header_dtype: str  # as written in the header ("BF16", "F32", ...)
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsCheckpoint:
    """The tensors of a checkpoint folder, indexed from the headers alone.

    `infos` maps each tensor name to its TensorInfo; `read(name, dtype)` copies one tensor out of
    its (mmap'd) file and converts it. Each read opens and closes its file, so no mapping outlives
    the read and the pages it touched leave the process's resident set with it.
    """

    def __init__(self, folder: Path, infos: dict[str, TensorInfo], files: list[Path]):
        self.folder = folder
        self.infos = infos
        self.files = files

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SafetensorsCheckpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise ConversionError(f"{folder} is not a directory (expected a HuggingFace checkpoint folder)")
        if (folder / SINGLE_FILE).is_file():  # transformers looks for the single file first too
            return cls._from_files(folder, [folder / SINGLE_FILE], weight_map=None)
        if (folder / INDEX_FILE).is_file():
            weight_map = _read_index(folder / INDEX_FILE)
            files = _shard_files(folder, weight_map)
            return cls._from_files(folder, files, weight_map)
        raise ConversionError(_no_safetensors_message(folder))

    @classmethod
    def _from_files(cls, folder: Path, files: list[Path], weight_map: dict[str, str] | None):
        infos: dict[str, TensorInfo] = {}
        for file in files:
            for info in read_header(file):
                if info.name in infos:
                    raise ConversionError(
                        f"tensor {info.name!r} is stored twice: in {infos[info.name].file.name} and "
                        f"{file.name}; the checkpoint is inconsistent (re-download or re-save it)"
                    )
                infos[info.name] = info
        if weight_map is not None:
            wrong = [
                f"{name} (index says {shard}, {'found in ' + infos[name].file.name if name in infos else 'in no shard'})"
                for name, shard in weight_map.items()
                if name not in infos or infos[name].file.name != Path(shard).name
            ]
            if wrong:
                raise ConversionError(
                    f"{folder / INDEX_FILE} lists tensors its shards do not hold: {_first(wrong)}. "
                    "The index and the shard files are from different saves; re-download the checkpoint."
                )
        return cls(folder, infos, files)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, freshly allocated and owned by the caller (safe to wrap as a Parameter
        without copying), converted to `dtype` when given."""
        info = self.infos.get(name)
        if info is None:
            raise ConversionError(f"no tensor named {name!r} in {self.folder}")
        try:
            with safe_open(str(info.file), framework="pt") as f:
                tensor = f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as err:  # the rust errors are plain exceptions
            raise ConversionError(f"could not read tensor {name!r} from {info.file}: {err}") from err
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor


def read_header(file: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes of every tensor in one safetensors file, from its header only."""
    try:
        with safe_open(str(file), framework="pt") as f:
            infos = []
            for name in f.keys():
                view = f.get_slice(name)
                header_dtype = view.get_dtype()
                infos.append(
                    TensorInfo(name, tuple(view.get_shape()), _DTYPES.get(header_dtype), header_dtype, file)
                )
            return infos
    except FileNotFoundError as err:
        raise ConversionError(f"{file} does not exist") from err
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
        raise ConversionError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated or corrupt - re-download it"
        ) from err


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"{index_file} is not valid JSON ({err}); re-download it") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_file} has no 'weight_map' table of tensor name -> shard file")
    return weight_map


def _shard_files(folder: Path, weight_map: dict[str, str]) -> list[Path]:
    """The distinct shard files the index names, in first-mention order, all checked to exist."""
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ConversionError(
                f"{folder / INDEX_FILE} maps {name!r} to {shard!r}; shard entries must be plain file "
                "names inside the checkpoint folder"
            )
        shards.setdefault(shard, []).append(name)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        detail = "; ".join(f"{s} (holds {_first(shards[s], 3)})" for s in missing)
        raise ConversionError(
            f"{folder} is missing {len(missing)} of the {len(shards)} shard files that {INDEX_FILE} "
            f"names: {detail}. The download is incomplete; download the missing files again."
        )
    return [folder / s for s in shards]


def _no_safetensors_message(folder: Path) -> str:
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    pickles = [n for n in present if n in _PICKLE_NAMES or n.endswith(_PICKLE_SUFFIXES)]
    shards = [n for n in present if n.endswith(".safetensors")]
    if shards:
        return (
            f"{folder} has safetensors files ({_first(shards, 3)}) but neither {SINGLE_FILE} nor "
            f"{INDEX_FILE}; without the index the shards cannot be trusted to be one checkpoint. "
            f"Download {INDEX_FILE} too (or pass a .gguf file instead)."
        )
    if pickles:
        return (
            f"{folder} holds only pickled weights ({_first(pickles, 3)}) and no {SINGLE_FILE}. "
            "hookedcot never unpickles checkpoints, because unpickling can run arbitrary code. "
            "Convert the folder to safetensors once, in an environment you trust, e.g.:\n"
            "  python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\"\n"
            "(transformers loads .bin files with torch.load(weights_only=True)); then load the folder again."
        )
    listing = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "") if present else "nothing"
    return (
        f"{folder} has no weights hookedcot can read: expected {SINGLE_FILE} or {INDEX_FILE} plus its "
        f"shards (the folder holds {listing}). Pass a HuggingFace checkpoint folder or a .gguf file."
    )


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
