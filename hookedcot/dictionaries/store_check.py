"""Validation of an activation store read back from disk (store.py's reader), as untrusted input.

Why up front, at open: `ActivationStore` reads shards lazily, deep inside a training loop; a store
whose manifest lies (a shard missing, a count that is not a count, a shape that disagrees with
`d`, statistics of the wrong length) should be refused when it is opened, with the file named,
not hours later as a KeyError or a shape error in a matmul. Only headers are read here (a few KB
per shard); values are checked as each shard is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from hookedcot.dictionaries.files import DictionaryFileError, plain_file, read_tensors

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
INT_DTYPES = ("I64", "I32", "I16", "I8", "U8")
FLOAT32_MAX = 3.0e38  # a little under torch.finfo(torch.float32).max: a mean above it is inf in float32
FLOAT32_TINY = 1.2e-38  # torch.finfo(torch.float32).tiny: a scale below it is 0 in float32


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _finite_list(value: Any, d: int, count: int) -> bool:
    """A list of `d` numbers whose means over `count` tokens are finite in float32 (what stats() returns)."""
    return isinstance(value, list) and len(value) == d and all(
        type(x) in (int, float) and math.isfinite(x) and abs(x) / count < FLOAT32_MAX for x in value)


def _check_manifest(folder: Path, manifest: dict[str, Any]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(models, hooks, shards) of a manifest that is consistent with itself and its shards' headers."""
    where = folder / "store.json"

    def bad(what: str) -> DictionaryFileError:
        return DictionaryFileError(f"{where}: {what}; the store is damaged or was edited by hand: collect it again")

    models, hooks, shards = manifest.get("models"), manifest.get("hooks"), manifest.get("shards")
    if not isinstance(models, dict) or not models or not all(isinstance(m, str) and m for m in models):
        raise bad(f"'models' must be an object {{model name: model id}}, got {str(models)[:100]}")
    if not isinstance(hooks, list) or not hooks or not all(isinstance(h, str) and h for h in hooks) \
            or len(set(hooks)) != len(hooks):
        raise bad(f"'hooks' must be a list of distinct hook names, got {str(hooks)[:100]}")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise bad(f"'shards' must be a list of objects, got {str(shards)[:100]}")
    n_batches = manifest.get("n_batches")
    if not _count(n_batches) or not _count(manifest.get("n_sequences")):
        raise bad(f"'n_batches' and 'n_sequences' must be counts, got {n_batches!r}, {manifest.get('n_sequences')!r}")
    covered = 0
    for s in shards:
        batches = s.get("batches")
        if not _count(s.get("n_tokens")) or not (isinstance(batches, list) and len(batches) == 2
                                                 and all(_count(b) for b in batches)
                                                 and covered == batches[0] <= batches[1] <= n_batches):
            raise bad(f"shard entry {str(s)[:120]} needs 'n_tokens' (a count) and 'batches' [first, end] that "
                      f"continue the previous shard's (end {covered}) within n_batches={n_batches}")
        covered = batches[1]
    if not shards:
        return list(models), list(hooks), shards
    d = manifest.get("d")
    if not isinstance(d, dict) or set(d) != set(hooks) or not all(type(v) is int and v > 0 for v in d.values()):
        raise bad(f"'d' must give every hook's width (a positive int), got {str(d)[:100]}")
    stats, total = manifest.get("stats"), sum(s["n_tokens"] for s in shards)
    expected_stats = {f"{m}.{h}" for m in models for h in hooks}
    if not isinstance(stats, dict) or set(stats) != expected_stats:
        raise bad(f"'stats' must hold exactly {sorted(expected_stats)[:4]}, got {sorted(stats)[:4] if isinstance(stats, dict) else stats!r}")
    for key, width in ((f"{m}.{h}", d[h]) for m in models for h in hooks):
        stat = stats[key]
        norm = stat.get("sum_norm") if isinstance(stat, dict) else None
        if norm is None or stat.get("count") != total or not _finite_list(stat.get("sum"), width, total) \
                or not _finite_list(stat.get("sum_sq"), width, total) or min(stat["sum_sq"]) < 0 \
                or type(norm) not in (int, float) or not (math.isfinite(norm) and norm > 0) \
                or not FLOAT32_TINY < math.sqrt(width) / (norm / total) < FLOAT32_MAX:
            raise bad(f"statistics {key!r} must have count {total} (the shards' tokens), 'sum' and 'sum_sq' (>= 0) of "
                      f"{width} numbers whose means are finite in float32 and a positive 'sum_norm' whose "
                      "normalising factor is a finite, nonzero float32")
    names = [s.get("file") for s in shards]
    if len(set(map(str, names))) != len(names):
        raise bad("two shard entries name the same file")
    for s in shards:
        _check_shard_header(plain_file(folder, s.get("file"), "shard"), s["n_tokens"], list(models), hooks, d)
    return list(models), list(hooks), shards


def _check_shard_header(file: Path, n: int, models: list[str], hooks: list[str], d: dict[str, int]) -> None:
    expected = {f"acts.{m}.{h}": ([n, d[h]], FLOAT_DTYPES) for m in models for h in hooks}
    expected.update({name: ([n], INT_DTYPES) for name in ("tokens", "positions", "sequences")})
    try:
        with safe_open(file, framework="pt") as f:
            found = {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001 - the safetensors parser's own errors all mean "unreadable"
        raise DictionaryFileError(f"{file} is not a readable safetensors shard ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); collect the store again") from None
    if missing := sorted(set(expected) - set(found)):
        raise DictionaryFileError(f"{file} lacks {missing[:4]}; the shard does not belong to this store.json")
    for name, (shape, dtypes) in expected.items():
        if list(found[name][0]) != shape or found[name][1] not in dtypes:
            raise DictionaryFileError(f"{file}: {name} is {found[name][1]} {found[name][0]}, expected shape {shape} "
                                      f"({'/'.join(dtypes)}) from store.json; the shard does not belong to it")


def _check_batch(file: Path, batch: Any, n_sequences: int) -> None:
    """Values of a loaded shard: finite activations, sequence indices and positions in range."""
    if not bool(torch.isfinite(batch.acts).all()):
        raise DictionaryFileError(f"{file}: the activations hold NaN or inf; the shard is corrupt (or the model "
                                  "overflowed in its dtype): collect it again")
    if len(batch.sequences) and (int(batch.sequences.min()) < 0 or int(batch.sequences.max()) >= n_sequences
                                 or int(batch.positions.min()) < 0):
        raise DictionaryFileError(f"{file}: sequence indices or positions out of range for a store of {n_sequences} "
                                  "sequences; the shard is corrupt: collect it again")


def _check_tokens(file: Path, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """tokens.safetensors: `ids` [n] and `offsets` [n_sequences + 1], rising from 0 to n."""
    tokens = read_tensors(file)
    ids, offsets = tokens.get("ids"), tokens.get("offsets")
    if ids is None or offsets is None or ids.dim() != 1 or offsets.dim() != 1 or ids.is_floating_point() \
            or offsets.is_floating_point() or len(offsets) != manifest["n_sequences"] + 1 or int(offsets[0]) != 0 \
            or int(offsets[-1]) != len(ids) or bool((offsets[1:] < offsets[:-1]).any()):
        raise DictionaryFileError(f"{file} must hold integer 'ids' [n] and 'offsets' [n_sequences + 1 = "
                                  f"{manifest['n_sequences'] + 1}] rising from 0 to n; the store is damaged: collect "
                                  "it again")
    return tokens
