"""A GGUF file's declared layout, checked against the file before anything is parsed or allocated.

Why: the `gguf` package's reader trusts every count and size in the file. A flipped bit in an
array's element count makes it loop over 10^18 elements; a wrong tensor offset makes it hand out
bytes of another tensor (or of the metadata) as weights. So before the reader runs, this module
walks the header once in plain Python, touching only the bytes it reads, and refuses the file when

- a count or length cannot fit in the bytes that remain (each element needs at least its minimum
  encoded size), or a value type, tensor type, dimension count or alignment is not one GGUF has;
- a key or tensor name repeats, or is not UTF-8;
- a tensor's size does not fit the file, or its bytes are not where llama.cpp's own loader
  requires them: in file order, each at the previous one's end rounded up to the alignment, the
  first at the data section's start (so no tensor overlaps, aliases or skips over another), and
  nothing but padding after the last (a header that lists fewer tensors than the file holds).

Work and memory are linear in the header's size; no weight byte is read.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from hookedcot.conversions import ConversionError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 4  # arrays of arrays: GGUF allows them; no model file nests deeper than 2
_DEFAULT_ALIGNMENT = 32
# GGUF value type id -> struct code of a fixed-size scalar (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MIN_VALUE_BYTES = {**{t: struct.calcsize(c) for t, c in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}


@dataclass(frozen=True)
class TensorSpan:
    """One tensor as the header declares it, after the checks: torch-order shape, absolute range."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    size: int  # the file's size in bytes
    data_start: int
    alignment: int
    tensors: list[TensorSpan]


class _Cursor:
    """Reads little- or big-endian values from a byte buffer, refusing to run past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path, self.order = buf, 0, path, "<"

    def fail(self, why: str) -> ConversionError:
        return ConversionError(
            f"{self.path} is not a readable GGUF file: {why} (at byte {self.pos} of {len(self.buf)}). It is corrupt, "
            "truncated or not a GGUF file at all; download it again"
        )

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(f"{what} needs {n} bytes but only {self.left()} remain")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(f"{what} needs {n} bytes but only {self.left()} remain")
        self.pos += n

    def scalar(self, code: str, what: str) -> int | float | bool:
        return struct.unpack(self.order + code, self.take(struct.calcsize(code), what))[0]

    def count(self, what: str, each: int) -> int:
        """A uint64 count of items needing at least `each` bytes apiece, checked against what remains."""
        n = self.scalar("Q", what)
        if n * each > self.left():
            raise self.fail(f"{what} declares {n} items of at least {each} bytes, but only {self.left()} bytes remain")
        return n

    def string(self, what: str) -> str:
        raw = self.take(self.count(f"the length of {what}", 1), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 ({exc})") from exc

    def skip_value(self, kind: int, what: str, depth: int = 0) -> int | float | bool | None:
        """Step over one value of GGUF type `kind`; scalars are returned (alignment needs one)."""
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            self.skip(self.count(f"the length of {what}", 1), what)
            return None
        if kind != _ARRAY:
            raise self.fail(f"{what} has value type {kind}, which GGUF does not define (0-12)")
        if depth >= _MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        item = self.scalar("I", f"the element type of {what}")
        if item not in _MIN_VALUE_BYTES:
            raise self.fail(f"{what} is an array of value type {item}, which GGUF does not define (0-12)")
        n = self.count(f"the element count of {what}", _MIN_VALUE_BYTES[item])
        if item in _SCALARS:
            self.skip(n * _MIN_VALUE_BYTES[item], what)
        else:
            for _ in range(n):
                self.skip_value(item, what, depth + 1)
        return None


def check_layout(path: Path) -> Layout:
    """Walk the GGUF header of `path`, check every declared count, size and offset against the
    file, and return where each tensor lies. Raises ConversionError naming the first problem."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise ConversionError(f"{path} is not a readable GGUF file: it is empty (an interrupted download?)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(_Cursor(buf, path), size)
    except OSError as exc:
        raise ConversionError(f"could not read {path}: {exc}") from exc


def _walk(cur: _Cursor, size: int) -> Layout:
    if cur.take(4, "the magic number") != _MAGIC:
        raise cur.fail("it does not start with the magic bytes 'GGUF'")
    version_bytes = cur.take(4, "the version")
    version = struct.unpack("<I", version_bytes)[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine (as the gguf package detects it)
        cur.order, version = ">", struct.unpack(">I", version_bytes)[0]
    if version not in _VERSIONS:
        raise cur.fail(f"GGUF version {version}; supported versions: {', '.join(map(str, _VERSIONS))}")
    # A tensor entry takes at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes;
    # a key/value entry at least 8 (key length) + 4 (type) + 1 (value).
    n_tensors = cur.count("the tensor count", 24)
    n_kv = cur.count("the metadata key count", 13)
    alignment = _DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in keys:
            raise cur.fail(f"metadata key {key!r} appears twice")
        keys.add(key)
        kind = cur.scalar("I", f"the value type of {key!r}")
        value = cur.skip_value(kind, f"metadata {key!r}")
        if key == "general.alignment":
            if kind != 4 or not value or value & (value - 1):  # type: ignore[operator]
                raise cur.fail(f"general.alignment={value!r} (type {kind}) must be a power of two stored as uint32")
            alignment = int(value)  # type: ignore[arg-type]
    declared = [_tensor_entry(cur, i) for i in range(n_tensors)]
    names = [t[0] for t in declared]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise cur.fail(f"tensor name(s) {', '.join(map(repr, twice[:5]))} appear more than once")
    data_start = -(-cur.pos // alignment) * alignment
    return Layout(size, data_start, alignment, _place(cur, declared, data_start, alignment, size))


def _tensor_entry(cur: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int, int]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    name = cur.string(f"the name of tensor #{i}")
    n_dims = cur.scalar("I", f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:  # type: ignore[operator]
        raise cur.fail(f"tensor {name!r} declares {n_dims} dimensions; GGUF tensors have 1 to {_MAX_DIMS}")
    dims = [cur.scalar("Q", f"a dimension of tensor {name!r}") for _ in range(n_dims)]  # type: ignore[arg-type]
    raw_type = cur.scalar("I", f"the type of tensor {name!r}")
    offset = cur.scalar("Q", f"the offset of tensor {name!r}")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has type id {raw_type}, which this gguf package does not know") from None
    numel = 1
    for d in dims:
        numel *= d  # type: ignore[operator]
    if dims[0] % block:  # type: ignore[operator]
        raise cur.fail(f"tensor {name!r}'s innermost dimension {dims[0]} is not a multiple of {qtype.name}'s block of {block}")
    nbytes = numel // block * type_size
    if nbytes > cur.left():  # the data section lies after the header, so it is shorter than what remains
        raise cur.fail(f"tensor {name!r} ({qtype.name}, dims {dims}) needs {nbytes} bytes, more than the rest of the file")
    return name, int(raw_type), tuple(int(d) for d in reversed(dims)), int(offset), nbytes  # type: ignore[arg-type]


def _place(
    cur: _Cursor, declared: list[tuple[str, int, tuple[int, ...], int, int]], data_start: int, alignment: int, size: int
) -> list[TensorSpan]:
    """Tensors where llama.cpp's loader requires them: packed in file order, each aligned."""
    spans, expected = [], 0
    for name, qtype, shape, offset, nbytes in declared:
        if offset != expected:
            raise cur.fail(
                f"tensor {name!r} declares data offset {offset} but must start at {expected} (right after the "
                f"previous tensor, aligned to {alignment}); overlapping, aliased or misplaced tensor data"
            )
        if data_start + offset + nbytes > size:
            raise ConversionError(
                f"{cur.path} is truncated: tensor {name!r} ends at byte {data_start + offset + nbytes} but the file has "
                f"{size} bytes. Download it again."
            )
        spans.append(TensorSpan(name, qtype, shape, data_start + offset, nbytes))
        expected = -(-(offset + nbytes) // alignment) * alignment
    if data_start + expected < size:
        raise cur.fail(
            f"{size - data_start - expected} bytes follow the last tensor's data; the header lists fewer tensors than "
            "the file holds"
        )
    return spans
