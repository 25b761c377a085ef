"""Mutations of dictionary and lens folders for tests/test_fuzz_dictionaries.py: a JSON tree edited
at any depth, a safetensors file's bytes, header or values, a torch.save state dict; `Folder`
writes a valid folder back with one file mutated per case.

Why beside fuzzing.py rather than in it: these know the dictionary files' tensor names and one
folder-per-case layout; fuzzing.py's helpers (byte, JSON-object mutations, Tally) are reused.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from fuzzing import deep_nest, dumps, mutate_bytes, mutate_json_object, random_json

D_IN = 8


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys / indices) into a JSON value, the value itself excluded."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def mutate_tree(obj: dict, rng: random.Random) -> tuple[str, str]:
    """A value anywhere in the tree replaced by any JSON value, deleted, or its container emptied;
    or (a third of the time) fuzzing.mutate_json_object's top-level and text mutations."""
    if rng.random() < 0.35:
        return mutate_json_object(obj, rng, list(obj))
    obj = json.loads(json.dumps(obj))
    path = rng.choice(_paths(obj))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    kind = rng.choice(["value", "value", "value", "delete", "off by one", "stringify"])
    old = parent[path[-1]]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "off by one" and type(old) is int:
        parent[path[-1]] = old + rng.choice([-1, 1, -old - 1, 2**40])
    elif kind == "stringify":
        parent[path[-1]] = str(old) if not isinstance(old, (dict, list)) else json.dumps(old)
    else:
        parent[path[-1]] = random_json(rng) if rng.random() < 0.9 else deep_nest(100_000)
    return dumps(obj), f"{kind} {'.'.join(map(str, path))[:60]}"


def mutate_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A structural edit of a safetensors header, re-serialised with a length that fits it."""
    n = struct.unpack_from("<Q", data)[0]
    header, body = json.loads(data[8: 8 + n]), data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    begin, end = entry["data_offsets"]
    kind = rng.choice(["dtype", "shape", "shape", "offsets", "drop", "rename", "add", "entry"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", random_json(rng)])
    elif kind == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice([[], [0], shape[::-1], [*shape, 1], [2**62, 2**62], [-1, *shape[1:]],
                                     [s * 2 for s in shape], [s // 2 for s in shape], [1, *shape], random_json(rng)])
    elif kind == "offsets":
        shift = rng.choice([1, 4, 8, 64])
        entry["data_offsets"] = rng.choice([[begin + shift, end + shift], [end, begin], [begin, begin], [0, end - begin],
                                            [begin, 2**64], [float(begin), float(end)], random_json(rng)])
    elif kind == "drop":
        del header[name]
    elif kind == "rename":
        header[rng.choice(["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "input_scale",
                           "0.weight", "1.bias", "layer_translators.0.weight", "tokens", "ids", "x"])] = header.pop(name)
    elif kind == "add":
        header[name + "_copy"] = dict(entry)
    else:
        header[name] = random_json(rng)
    raw = dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body, f"header {kind} of {name}"


def mutate_values(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One float tensor's values (or one value) set to NaN, inf or a huge number; header unchanged."""
    n = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8: 8 + n])
    floats = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and v["data_offsets"][1] > v["data_offsets"][0]]
    if not floats:
        return data, "values (no float tensor)"
    name = rng.choice(floats)
    begin, end = header[name]["data_offsets"]
    value = rng.choice([math.nan, math.inf, -math.inf, 3e38, 1e20])
    count = (end - begin) // 4
    at = rng.randrange(count)
    span = range(count) if rng.random() < 0.3 else [at]
    out = bytearray(data)
    for i in span:
        struct.pack_into("<f", out, 8 + n + begin + 4 * i, value)
    return bytes(out), f"values of {name} := {value} ({len(span)})"


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.random()
    if kind < 0.4:
        n = struct.unpack_from("<Q", data)[0]
        out, what, _ = mutate_bytes(data, rng, [(0, 8)], [0, 8, 8 + n, len(data)])
        return out, what
    if kind < 0.8:
        return mutate_header(data, rng)
    return mutate_values(data, rng)


def mutate_pickle(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """params.pt (a torch.save zip): its bytes, or its state dict edited and saved again."""
    if rng.random() < 0.5:
        out, what, _ = mutate_bytes(data, rng, [], [0, len(data) // 2, len(data)])
        return out, what
    state = torch.load(io.BytesIO(data), weights_only=True)
    name = rng.choice(sorted(state))
    kind = rng.choice(["drop", "shape", "dtype", "nan", "rename", "value", "extra", "not a dict"])
    if kind == "drop":
        del state[name]
    elif kind == "shape":
        state[name] = torch.zeros(rng.choice([(D_IN + 1, D_IN), (D_IN,), (1, D_IN), (D_IN, D_IN, 1), ()]))
    elif kind == "dtype":
        state[name] = state[name].to(rng.choice([torch.int64, torch.float16, torch.bool, torch.float64]))
    elif kind == "nan":
        state[name] = state[name].clone().fill_(rng.choice([math.nan, math.inf]))
    elif kind == "rename":
        state[rng.choice(["9.weight", "0.bias.x", "layer_translators.0.weight", "weight"])] = state.pop(name)
    elif kind == "value":
        state[name] = rng.choice([1.5, "tensor", [1, 2], None, {"a": torch.zeros(2)}])
    elif kind == "extra":
        state["3.weight"] = torch.zeros(D_IN, D_IN)
    else:
        state = rng.choice([list(state.values()), torch.zeros(2), 7])
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue(), f"state dict {kind} of {name}"


class Folder:
    """A valid folder's files (relative path -> bytes); `case` writes it back with one file mutated."""

    def __init__(self, root: Path, files: dict[str, bytes]):
        self.root, self.files = root, files

    def case(self, rng: random.Random) -> str:
        name = rng.choice(sorted(self.files))
        data = self.files[name]
        if name.endswith(".json"):
            text, what = mutate_tree(json.loads(data), rng)
            mutated = text.encode("utf-8", "surrogatepass")
        elif name.endswith(".pt"):
            mutated, what = mutate_pickle(data, rng)
        else:
            mutated, what = mutate_safetensors(data, rng)
        if self.root.exists():
            shutil.rmtree(self.root)
        for rel, content in self.files.items():
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(mutated if rel == name else content)
        return f"{name}: {what}"
