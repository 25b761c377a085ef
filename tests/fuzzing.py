"""Seeded mutation fuzzing of hookedcot's loaders: mutate a tiny valid file, load it, classify.

Why seeded mutations rather than hypothesis: every case is reproducible from (loader, seed, index)
alone, the counts per loader are exact and the same on every machine, and a case costs one file
write and one load, so 1,000 cases per loader fit in the normal suite.

A case ends in exactly one of three ways, and `Tally` counts them:
- refused: a `hookedcot.HookedCoTError` (its class name is recorded);
- loaded: the caller's consistency check then runs on the result (and must pass);
- escaped: any other exception. The tests assert there are none (each is kept with its seed).

Every case is timed and its peak Python-heap allocation measured with tracemalloc (numpy arrays
and bytes count; torch's own tensor storage does not, so loaders that build tensors are checked
against the file size by construction and in a rlimited child process instead).
"""

from __future__ import annotations

import json
import math
import random
import struct
import time
import tracemalloc
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from hookedcot import HookedCoTError

INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 4095, 4096, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1,
                    2**32, 2**32 + 1, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@dataclass
class Tally:
    """Outcomes of one loader's cases, the slowest case and the largest Python allocation."""

    loader: str
    outcomes: Counter = field(default_factory=Counter)
    escaped: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")
    largest: tuple[int, str] = (0, "")
    cases: int = 0

    def record(self, label: str, seconds: float, peak: int, outcome: str) -> None:
        self.cases += 1
        self.outcomes[outcome] += 1
        if seconds > self.slowest[0]:
            self.slowest = (seconds, label)
        if peak > self.largest[0]:
            self.largest = (peak, label)

    def summary(self) -> str:
        refused = sum(n for k, n in self.outcomes.items() if k.startswith("refused"))
        kinds = ", ".join(f"{k.removeprefix('refused:')} {n}" for k, n in sorted(self.outcomes.items())
                          if k.startswith("refused"))
        return (f"{self.loader}: {self.cases} cases: {refused} refused ({kinds}); {self.outcomes['loaded']} loaded "
                f"(consistent); {len(self.escaped)} other exceptions; slowest {self.slowest[0] * 1000:.0f} ms "
                f"({self.slowest[1]}); largest Python allocation {self.largest[0] / 2**20:.2f} MiB ({self.largest[1]})")


def run_case(tally: Tally, label: str, load: Callable[[], Any], check: Callable[[Any], None],
             measure_memory: bool = True) -> None:
    """Run `load`; a HookedCoTError is a refusal, a result goes through `check` (an assertion
    failure there propagates: the loader accepted something inconsistent), anything else escapes."""
    if measure_memory:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        result = load()
        outcome = "loaded"
    except HookedCoTError as exc:
        result, outcome = None, f"refused:{type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - that is what is being looked for
        result, outcome = None, "escaped"
        tally.escaped.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if measure_memory else 0
        if measure_memory:
            tracemalloc.stop()
    tally.record(label, seconds, peak, outcome)
    if outcome == "loaded":
        try:
            check(result)
        except AssertionError as exc:
            raise AssertionError(f"{tally.loader} case {label} loaded but is inconsistent: {exc}") from exc


@contextmanager
def one_thread():
    """Tiny matmuls on one thread: on a busy machine torch's pool spins for milliseconds a call."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- byte mutations
def mutate_bytes(data: bytes, rng: random.Random, fields: list[tuple[int, int]], boundaries: list[int]) -> tuple[bytes, str, tuple[int, int]]:
    """One mutation of `data`; returns (mutated, description, (first, end) of the bytes it touched
    in the original's coordinates; end = len(data) when everything after `first` moved).

    `fields` are (offset, width) of the format's integer fields (counts, lengths, types, offsets,
    dimensions), where a corrupt value does the most harm; `boundaries` are structural offsets
    (between header entries, the start of the data) to truncate at."""
    kind = rng.choice(["flip", "flip", "byte", "field", "field", "field", "truncate", "insert", "delete", "duplicate"])
    n = len(data)
    if kind == "flip":
        at = rng.randrange(n) if rng.random() < 0.5 or not fields else rng.choice(fields)[0] + rng.randrange(8)
        at = min(at, n - 1)
        out = bytearray(data)
        out[at] ^= 1 << rng.randrange(8)
        return bytes(out), f"flip bit at {at}", (at, at + 1)
    if kind == "byte":
        at = rng.randrange(n)
        out = bytearray(data)
        out[at] = rng.randrange(256)
        return bytes(out), f"byte {at} := {out[at]}", (at, at + 1)
    if kind == "field" and fields:
        at, width = rng.choice(fields)
        value = rng.choice(INTERESTING_INTS + [n, n - at, n + 1, rng.randrange(2 ** (8 * width))])
        if rng.random() < 0.3:  # off by a little from the real value
            old = int.from_bytes(data[at: at + width], "little")
            value = old + rng.choice([-2, -1, 1, 2, 32, -32])
        value %= 2 ** (8 * width)
        out = data[:at] + value.to_bytes(width, "little") + data[at + width:]
        return out, f"field at {at} (width {width}) := {value}", (at, at + width)
    if kind == "truncate":
        at = rng.choice(boundaries) if boundaries and rng.random() < 0.6 else rng.randrange(n)
        return data[:at], f"truncate at {at}", (at, n)
    if kind == "insert":
        at, k = rng.randrange(n), rng.choice([1, 4, 8, 32])
        return data[:at] + bytes(rng.randrange(256) for _ in range(k)) + data[at:], f"insert {k} at {at}", (at, n)
    if kind == "delete":
        at, k = rng.randrange(n), rng.choice([1, 4, 8, 32])
        return data[:at] + data[at + k:], f"delete {k} at {at}", (at, n)
    at, k = rng.randrange(n), rng.choice([8, 24, 64])  # duplicate a chunk in place (repeated entries)
    return data[:at] + data[at: at + k] + data[at:], f"duplicate {k} at {at}", (at, n)


# ---------------------------------------------------------------------------- JSON mutations
def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 3 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice(INTERESTING_INTS + [-1, -(2**31), -(2**63)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e-300, -1.0, 0.5, 1e300, math.inf, -math.inf, math.nan, 1e-6, 2.0])
    if kind == 4:
        return rng.choice(["", "false", "true", "0", "64", "1e-5", "silu", "llama", "qwen2", "default", "linear",
                           "llama3", "\x00", "é" * 3, "../../etc/passwd", "a" * 1000])
    if kind == 5:
        return rng.randrange(-5, 200)
    if kind == 6:
        return rng.uniform(-10, 10)
    if kind == 7:
        return "x" * rng.randrange(0, 50)
    if kind == 8:
        return [rng.randrange(300) for _ in range(rng.randrange(4))]
    if kind == 9:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 10:
        return {rng.choice(["factor", "rope_type", "type", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings", "rope_theta", "x"]): random_json(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return deep_nest(rng.choice([50, 200, 1000, 5000, 100_000]))


def deep_nest(depth: int) -> Any:
    """A marker the encoder below expands into `depth` nested arrays (json.dumps would recurse)."""
    return {"__deep__": depth}


def dumps(value: Any) -> str:
    """json.dumps, except deep-nesting markers are written as literal bracket runs."""
    text = json.dumps(value)
    while '{"__deep__": ' in text:
        at = text.index('{"__deep__": ')
        end = text.index("}", at)
        depth = int(text[at + 13: end])
        text = text[:at] + "[" * depth + "]" * depth + text[end + 1:]
    return text


def mutate_json_object(obj: dict[str, Any], rng: random.Random, keys: list[str]) -> tuple[str, str]:
    """One mutation of a JSON object, returned as text: a value replaced by a value of any type
    (nested ones included), a key dropped, an unknown key added, a key written twice, a
    structural byte edit of the text, or a truncation."""
    kind = rng.choice(["value", "value", "value", "value", "nested", "drop", "add", "duplicate", "text", "truncate"])
    obj = json.loads(json.dumps(obj))
    if kind in ("value", "nested"):
        key = rng.choice(keys)
        target = obj
        if kind == "nested":  # inside rope_scaling / rope_parameters when present
            inner = [k for k, v in obj.items() if isinstance(v, dict)]
            if inner:
                target = obj[rng.choice(inner)]
                key = rng.choice(list(target) or ["factor"])
        target[key] = random_json(rng)
        return dumps(obj), f"{key} := {dumps(target[key])[:60]}"
    if kind == "drop":
        key = rng.choice(list(obj))
        del obj[key]
        return dumps(obj), f"drop {key}"
    if kind == "add":
        key = rng.choice(["unknown_key", "rope_scaling", "quantization_config", "transformers.x", "layer_types"])
        obj[key] = random_json(rng)
        return dumps(obj), f"add {key}"
    text = dumps(obj)
    if kind == "duplicate":
        key = rng.choice(list(obj))
        dup = f'"{key}": {dumps(random_json(rng))}, '
        return "{" + dup + text[1:], f"duplicate {key}"
    if kind == "text":
        at = rng.randrange(len(text))
        return text[:at] + rng.choice(['"', "{", "}", "[", "]", ",", ":", "\\", "\x00", "é", "1", "-"]) + text[at + 1:], \
            f"text edit at {at}"
    at = rng.randrange(len(text))
    return text[:at], f"truncate at {at}"


def u64(data: bytes, at: int) -> int:
    return struct.unpack_from("<Q", data, at)[0]


# ---------------------------------------------------------------------------- a tiny HF checkpoint
TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 40, "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 8, "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
    "eos_token_id": [2, 3], "pad_token_id": None, "torch_dtype": "float32", "transformers_version": "4.57.0",
}


def tiny_hf_tensors(seed: int = 0) -> dict[str, Any]:
    """transformers-named float32 tensors for TINY_HF_CONFIG, written without transformers (a few
    KB: a case is one small write and one load)."""
    import torch

    cfg = TINY_HF_CONFIG
    d, m, v, h, g, k = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_attention_heads"],
                        cfg["num_key_value_heads"], cfg["head_dim"])
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes.update({f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                       f"{p}.self_attn.q_proj.weight": (h * k, d), f"{p}.self_attn.k_proj.weight": (g * k, d),
                       f"{p}.self_attn.v_proj.weight": (g * k, d), f"{p}.self_attn.o_proj.weight": (d, h * k),
                       f"{p}.mlp.gate_proj.weight": (m, d), f"{p}.mlp.up_proj.weight": (m, d),
                       f"{p}.mlp.down_proj.weight": (d, m)})
    return {name: torch.randn(shape, generator=gen) / shape[-1] ** 0.5 + (1.0 if len(shape) == 1 else 0.0)
            for name, shape in shapes.items()}
