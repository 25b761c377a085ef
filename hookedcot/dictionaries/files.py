"""Reading the dictionary and lens files (SAEs, crosscoders, tuned lenses, activation stores) as
untrusted input: every way such a file can be wrong ends in a `DictionaryFileError` that names the
file, what is wrong and what to do, never in a KeyError, TypeError or a parser's own exception.

Why one module: the four loaders read the same two kinds of file (a JSON config or manifest, and
safetensors tensors) and must refuse the same things the same way: JSON that is not one object,
repeated keys (which value counts would be a guess), nesting deep enough to exhaust the stack,
sizes that are not positive ints (bools and floats included), tensors that are not floating point
or hold NaN / inf.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hookedcot.errors import HookedCoTError

MAX_JSON_BYTES = 64 * 2**20  # a manifest of a very large store is a few MB


class DictionaryFileError(HookedCoTError, ValueError):
    """A dictionary or lens file (SAE, crosscoder, tuned lens, activation store) that cannot be
    trusted: unreadable, inconsistent with its config, or holding non-finite values."""


class DictionaryFileNotFoundError(DictionaryFileError, FileNotFoundError):
    """A file a dictionary or lens folder must hold is missing."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, strictly: one object, no repeated key, bounded size and depth."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise DictionaryFileError(f"{path} is {size} bytes; a config or manifest is at most {MAX_JSON_BYTES}: "
                                      "is this the right file?")
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DictionaryFileError(f"{path} cannot be read as UTF-8 text ({exc}); rewrite it with the tool that "
                                  "made it") from None

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            repeated = sorted({k for k in keys if keys.count(k) > 1})
            raise DictionaryFileError(f"{path} writes the key(s) {repeated[:5]} twice; which value is meant is a "
                                      "guess, so the file is refused: keep one of each")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=no_repeats)
    except RecursionError:
        raise DictionaryFileError(f"{path} nests JSON too deep to read; a config is a flat object") from None
    except ValueError as exc:  # JSONDecodeError, and ints of more digits than Python converts
        if isinstance(exc, DictionaryFileError):
            raise
        raise DictionaryFileError(f"{path} is not valid JSON ({exc}); rewrite it with the tool that made it") from None
    if not isinstance(value, dict):
        raise DictionaryFileError(f"{path} holds a JSON {type(value).__name__}, not an object of settings")
    return value


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; anything the safetensors parser refuses (a corrupt
    header, offsets outside the data, an unknown dtype, a truncated file) is a DictionaryFileError."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - the parser's own errors (SafetensorError, OSError, ...) mean one thing
        raise DictionaryFileError(f"{path} is not a readable safetensors file ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); re-save it") from None


def float_tensor(path: Path, name: str, tensor: Tensor, ndim: int | None = None) -> Tensor:
    """`tensor` if it is floating point, finite and (when given) of `ndim` dimensions."""
    if not tensor.is_floating_point():
        raise DictionaryFileError(f"{path}: {name} has dtype {tensor.dtype}; dictionary weights are floating point")
    if ndim is not None and tensor.dim() != ndim:
        raise DictionaryFileError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {ndim} dimensions")
    if not bool(torch.isfinite(tensor).all()):
        raise DictionaryFileError(f"{path}: {name} holds NaN or inf; the file is corrupt or the training diverged")
    return tensor


def positive_int(path: Path, cfg: dict[str, Any], key: str, *, required: bool = True) -> int | None:
    """cfg[key] as a positive int (not a bool, not a float, not a string); None when absent and
    not required."""
    value = cfg.get(key)
    if value is None and not required:
        return None
    if type(value) is not int or value <= 0:
        raise DictionaryFileError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return value


def optional_type(path: Path, cfg: dict[str, Any], key: str, kinds: tuple[type, ...]) -> Any:
    """cfg[key] when absent/None or of one of `kinds` (bool is never an int or float here); else refused."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise DictionaryFileError(f"{path}: {key!r} must be {names} (or absent), got {value!r}")
    return value


def plain_file(folder: Path, name: Any, what: str) -> Path:
    """folder / name when `name` is a plain file name inside `folder` (no path separators, no '..')."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise DictionaryFileError(f"{folder}: {what} {name!r} is not a file name inside the folder")
    path = folder / name
    if not path.is_file():
        raise DictionaryFileNotFoundError(f"{path} ({what}) not found; the folder is incomplete: copy it whole")
    return path
