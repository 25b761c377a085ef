"""What every benchmark shares: the run's settings, the checkpoints, the machine, the timer.

Every figure the suite reports is a ratio measured in one run against a reference on the same
weights and inputs, with repetitions of the tools interleaved (round-robin, rotating who goes
first) so that a noisy machine slows every tool alike; each tool runs in a process of its own
(`benchmarks/processes.py`). Warm-up calls are excluded; the JSON keeps
each tool's median, min and max; a ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_DIR = Path(os.environ.get("HOOKEDCOT_BENCH_CACHE", "~/.cache/hookedcot-bench")).expanduser()
SMOLLM2 = "smollm2-135m-instruct"
# SmolLM2's exact shape with random weights: what a machine without the embedded GGUF runs (the GPU
# machine: the 98 MB file does not travel there). Same FLOPs and bytes, so the same timings.
SMOLLM2_SHAPE = "smollm2-135m-shape"

# Random-weight checkpoints with the real shapes of the models the design's anchors used.
# name -> (transformers config class, config kwargs). Written down here so a run can be repeated.
RANDOM_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    SMOLLM2_SHAPE: ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )),
    "qwen2-0.5b-shape": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=131072, use_sliding_window=False,
        sliding_window=131072, max_window_layers=24, bos_token_id=151643, eos_token_id=151643,
    )),
    "llama3.2-1b-shape": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=5e5, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
    )),
}
DEFAULT_MODELS = [SMOLLM2, *(m for m in RANDOM_SPECS if m != SMOLLM2_SHAPE)]
ALL_PEERS = ("hf_sdpa", "hf_eager", "tl", "bridge", "nnsight")


@dataclass
class Settings:
    """One run of the suite. `size` is "full", "quick" or "tiny" (the smoke test's)."""

    size: str = "full"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    out_dir: Path = Path("bench-results")
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    peers: tuple[str, ...] = ALL_PEERS
    threads: int = 0  # 0: every core
    cache_dir: Path = CACHE_DIR
    models_explicit: bool = False  # --models given: run every benchmark on every listed model
    peers_everywhere: bool = False  # else peers beyond the reference run on SmolLM2 only (time)

    def models_for(self, skip_by_default: set[str] = frozenset()) -> list[str]:
        """The models a benchmark runs: all listed ones, less its `skip_by_default` (too slow for
        the default CPU pass) unless the models were named explicitly."""
        return [m for m in self.models if self.models_explicit or m not in skip_by_default]

    def peers_for(self, model: str, extra_models: set[str] = frozenset()) -> tuple[str, ...]:
        if self.peers_everywhere or is_smollm2(model) or model in extra_models or self.size == "tiny":
            return self.peers
        return tuple(p for p in self.peers if p == "hf_sdpa")

    @property
    def gpu(self) -> bool:
        """A CUDA run: every model gets the CPU pass's SmolLM2 treatment (time is no object there)."""
        return self.device.startswith("cuda")

    @property
    def quick(self) -> bool:
        return self.size in ("quick", "tiny")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def wants(self, peer: str) -> bool:
        return peer in self.peers


# ---------------------------------------------------------------- checkpoints
def is_smollm2(model: str) -> bool:
    """SmolLM2, real or its random-weight twin: the model every tool and shape runs on."""
    return model in (SMOLLM2, SMOLLM2_SHAPE)


def checkpoint_folder(model: str, cache_dir: Path = CACHE_DIR) -> Path:
    """An HF safetensors folder for `model`, built once and reused: the embedded SmolLM2 GGUF as
    transformers dequantises it (plus its tokenizer), a RANDOM_SPECS entry with random weights, or
    an existing folder given by path."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    folder = cache_dir / model
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    if model not in RANDOM_SPECS and model != SMOLLM2:
        raise ValueError(f"unknown model {model!r}: use {', '.join(DEFAULT_MODELS)} or a checkpoint folder")
    partial = cache_dir / f".{model}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        (_save_smollm2 if model == SMOLLM2 else lambda f: _save_random(model, f))(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # e.g. no embedded GGUF here: leave nothing behind
        raise
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # complete or absent, never half-written
    return folder


def _save_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hookedcot.embedded import embedded_model_path

    gguf = embedded_model_path(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; without these transformers refuses to save "a GGUF model".
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    # Keys the GGUF conversion adds that a hub config.json does not have (and that hookedcot's
    # strict config check rejects): the GGUF's general.name and its unk token id.
    config = json.loads((folder / "config.json").read_text())
    for key in ("_model_name_or_path", "unk_token_id"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _save_random(name: str, folder: Path) -> None:
    import transformers

    cls_name, kwargs = RANDOM_SPECS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)


def checkpoint_shape(folder: Path) -> tuple[int, int]:
    """(layers, vocabulary size) from a checkpoint folder's config.json: what a benchmark's parent
    process needs to know about a model it never loads (the tools run in processes of their own)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return config["num_hidden_layers"], config["vocab_size"]


def random_tokens(batch: int, pos: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids drawn away from the special ids at the ends of real vocabularies."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(4, min(vocab, 30000) - 1), (batch, pos), generator=gen)


# ---------------------------------------------------------------- machine
def machine_info(settings: Settings) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": settings.device,
        "dtype": settings.dtype_name,
        "size": settings.size,
        "load_average_at_start": os.getloadavg(),
        "versions": package_versions(),
    }
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("hookedcot", "torch", "transformers", "transformer_lens", "nnsight", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------- timing
def hookedcot_allocator() -> bool:
    """Turn on hookedcot's allocator option (freed memory stays in the process, see the README's
    Performance section) for hookedcot's own figures. It is process-wide: call it only in a
    process that times hookedcot alone, never where a peer is timed. True when in force."""
    from hookedcot import retain_freed_memory

    return retain_freed_memory()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, device: str = "cpu",
    failures: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, `reps` rounds, each round calling every function once
    in a rotated order; `warmup` untimed rounds first. A function that raises during warm-up is
    dropped and its error recorded in `failures` (a peer's bug must not sink the others)."""
    fns = dict(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for n in list(fns):
                try:
                    fns[n]()
                except Exception as err:  # noqa: BLE001
                    if failures is None:
                        raise
                    failures[n] = f"raised {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                    del fns[n]
        names = list(fns)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(reps if names else 0):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                sync(device)
                t0 = time.perf_counter()
                fns[n]()
                sync(device)
                times[n].append(time.perf_counter() - t0)
    return times


def stats(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(num, den))


def budget_verdict(ratio: float | None, budget: float, higher_is_better: bool) -> str:
    if ratio is None:
        return "n/a"
    ok = ratio >= budget if higher_is_better else ratio <= budget
    return "met" if ok else "MISSED"


# ---------------------------------------------------------------- results
def result(name: str, rows: list[dict], skipped: list[dict], notes: list[str], budgets: list[dict]) -> dict:
    """The shape every benchmark returns (and the smoke test checks)."""
    return {"benchmark": name, "rows": rows, "skipped": skipped, "notes": notes, "budgets": budgets}


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def log(msg: str) -> None:
    """Progress of a long run, timestamped, on stdout."""
    print(f"   {time.strftime('%H:%M:%S')} {msg}", flush=True)


def short(model: str) -> str:
    """A model's name for tables: the spec name, or a folder's last component."""
    return Path(model).name if ("/" in model or os.sep in model) else model
