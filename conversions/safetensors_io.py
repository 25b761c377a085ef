"""Streaming reads of HuggingFace safetensors checkpoints, single-file or sharded.

Why a module of its own: loading must (a) know every tensor's name, shape and dtype before any
weight is read, so that a wrong checkpoint fails in milliseconds instead of after minutes of
reading, and (b) read one tensor at a time so peak memory stays near one copy of the weights.

The safetensors format makes both easy: 8 bytes of header length, a JSON table of name -> dtype,
shape and byte range, then the raw little-endian data. We parse the header ourselves (checking
every byte range against the file size, so a truncated download fails before any read) and read
each tensor with one `readinto` into a tensor we allocate. Why not safetensors' `safe_open`:
since 0.4 its `get_tensor` returns zero-copy views of a private mmap of the whole file, so every
parameter would pin a whole-file mapping for the model's lifetime (virtual size = tensors x file
size, charged in full under strict overcommit), page-cache pages touched while converting dtypes
would stay resident, and the model would change or crash (SIGBUS) if the file were rewritten.
`readinto` costs the same single copy, is faster than opening a mapping per tensor, and leaves the
loaded weights in memory the model owns: peak memory is the weights in the target dtype plus one
tensor in flight.

We never unpickle (`pytorch_model.bin`, `*.pt`): pickle runs arbitrary code. A folder holding only
such files gets an error that says how to convert it once, outside hookedcot.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hookedcot.conversions import ConversionError, parse_json, read_into, read_json_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_STAGING_BYTES = 8 << 20  # dtype conversion reads the source in chunks of this size

# safetensors header dtype -> (torch dtype name, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8), "BOOL": ("bool", 1),
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
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsCheckpoint:
    """The tensors of a checkpoint folder, indexed from the headers alone.

    `infos` maps each tensor name to its TensorInfo; `read(name, dtype)` reads one tensor into
    memory it allocates and converts it. Nothing stays open between reads."""

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
                if name not in infos or infos[name].file.name != shard
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
        if info.dtype is None:
            raise ConversionError(f"tensor {name!r} in {info.file} has dtype {info.header_dtype}, which torch cannot hold")
        target = dtype or info.dtype
        out = torch.empty(info.shape, dtype=target)
        if not info.nbytes:
            return out
        if target == info.dtype:
            read_into(info.file, info.offset, out.view(-1).view(torch.uint8).numpy(), name)
            return out
        # Convert through a small staging buffer: a whole source-dtype copy per tensor would be
        # freed at once, and such short-lived large blocks fragment the heap (RSS that never drops).
        flat, itemsize = out.view(-1), info.nbytes // info.numel
        per_chunk = max(1, _STAGING_BYTES // itemsize)
        staging = torch.empty(min(per_chunk, info.numel), dtype=info.dtype)
        for start in range(0, info.numel, per_chunk):
            n = min(per_chunk, info.numel - start)
            chunk = staging[:n]
            read_into(info.file, info.offset + start * itemsize, chunk.view(torch.uint8).numpy(), name)
            flat[start : start + n].copy_(chunk)
        return out


def read_header(file: Path) -> list[TensorInfo]:
    """Names, shapes, dtypes and byte ranges of every tensor in one safetensors file, from its
    header only; every range is checked against the file's size."""
    def corrupt(why: str) -> ConversionError:
        return ConversionError(f"{file} is not a readable safetensors file ({why}); it may be truncated or corrupt - re-download it")

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise corrupt(f"header length {header_len} does not fit in {size} bytes")
            header = parse_json(f.read(header_len), f"the header of {file}")
    except FileNotFoundError as err:
        raise ConversionError(f"{file} does not exist") from err
    except (OSError, ValueError) as err:  # ValueError: bad JSON or UTF-8
        if isinstance(err, ConversionError):
            raise
        raise corrupt(str(err)) from err
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise corrupt(f"__metadata__ must map names to strings, got {_short(entry)}")
            continue
        if not _well_formed(entry, data_size):
            raise corrupt(f"tensor {name!r} has a malformed or out-of-range header entry {_short(entry)}; an entry is "
                          "{\"dtype\": \"F32\", \"shape\": [non-negative ints], \"data_offsets\": [begin, end]} inside the data")
        header_dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        torch_name, itemsize = _DTYPES.get(header_dtype, (None, None))
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:  # unknown dtypes: named when read
            raise corrupt(f"tensor {name!r} spans {end - begin} bytes, but {header_dtype}{list(shape)} needs "
                          f"{math.prod(shape) * itemsize}")
        dtype = getattr(torch, torch_name, None) if torch_name else None
        infos.append(TensorInfo(name, shape, dtype, header_dtype, file, data_start + begin, end - begin))
    _check_tiling(infos, data_start, data_size, corrupt)
    return infos


def _well_formed(entry: object, data_size: int) -> bool:
    """A header entry with a string dtype, a shape of non-negative ints and an in-file byte range."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return False
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    ints = lambda xs: all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)  # noqa: E731
    return (isinstance(dtype, str) and isinstance(shape, list) and ints(shape) and isinstance(offsets, list)
            and len(offsets) == 2 and ints(offsets) and offsets[0] <= offsets[1] <= data_size)


def _check_tiling(infos: list[TensorInfo], data_start: int, data_size: int, corrupt) -> None:
    """The tensors' byte ranges tile the data section exactly, as the safetensors format requires
    (and its own reader enforces): no two overlap or alias, no bytes lie between or after them."""
    at = 0
    for info in sorted(infos, key=lambda i: (i.offset, i.nbytes)):
        begin = info.offset - data_start
        if begin != at:
            what = "overlaps or aliases the previous tensor" if begin < at else f"leaves bytes {at}-{begin} unclaimed"
            raise corrupt(f"tensor {info.name!r} (bytes {begin}-{begin + info.nbytes} of the data) {what}")
        at = begin + info.nbytes
    if at != data_size:
        raise corrupt(f"the tensors end at byte {at} of the data but the data section has {data_size} bytes")


def _short(entry: object, n: int = 200) -> str:
    text = repr(entry)
    return text if len(text) <= n else text[:n] + "..."


def _read_index(index_file: Path) -> dict[str, str]:
    index = read_json_file(index_file)
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
    missing = [s for s in shards if not _is_file(folder / s)]
    if missing:
        detail = "; ".join(f"{s} (holds {_first(shards[s], 3)})" for s in missing)
        raise ConversionError(
            f"{folder} is missing {len(missing)} of the {len(shards)} shard files that {INDEX_FILE} "
            f"names: {detail}. The download is incomplete; download the missing files again."
        )
    return [folder / s for s in shards]


def _is_file(path: Path) -> bool:
    """Path.is_file, with a name the OS rejects (too long, a NUL byte) reading as no file."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


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
