"""Question 4: loading the same checkpoint, each tool in a FRESH subprocess: wall time and peak
memory (the child's own high-water RSS, VmHWM) as a ratio to the weight bytes in the target dtype.
With `--device cuda` each tool loads onto the GPU, and the GPU's peak allocation
(`torch.cuda.max_memory_allocated`, load and first forward) is reported beside the host RSS.

The child imports torch, then the tool (each import timed), then records its resident memory (the
interpreter, torch and the tool's own modules), then loads, and after the memory figures loads
a second time: the load without any import cost. `load_x_weights` = (peak RSS - RSS before loading) / weight
bytes: the memory the load itself costs. `peak_x_weights` = peak RSS / weight bytes, imports
included. The checkpoint's files are read once beforehand, so every tool finds them in the page
cache. A child is `benchmarks/load_child.py`; run one by hand: `python -m benchmarks.load_child ours FOLDER float32`.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from benchmarks.common import (
    log, short,
    SMOLLM2, Settings, budget_verdict, is_smollm2, checkpoint_folder, paired_ratio, result, stats,
)
from benchmarks.peers import LABELS

NAME = "loading"
ROUNDS = {"full": 3, "quick": 1, "tiny": 1}  # the random-shape models: 1 round in full too
BUDGET = 1.05
LABELS = {**LABELS, "hf_sdpa": "HF from_pretrained", "ours_gguf": "hookedcot (GGUF)", "hf_gguf": "HF (GGUF)"}
SECONDS = ("torch_import_s", "import_s", "load_s", "load_again_s")  # what each child times (load_child.py)
_ELEM = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def weight_bytes_of_folder(folder: Path, dtype_bytes: int) -> int:
    """Bytes of the floating-point tensors the folder stores, converted to the target dtype."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name != "__metadata__" and entry["dtype"] in _ELEM:
                numel = 1
                for d in entry["shape"]:
                    numel *= d
                total += numel * dtype_bytes
    return total


def warm_page_cache(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def spawn(tool: str, source: Path, settings: Settings) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.load_child", tool, str(source), settings.dtype_name,
           str(settings.threads or 0), settings.device]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"child exited {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    import torch

    elem = torch.finfo(settings.dtype).bits // 8
    for model in settings.models_for():
        folder = checkpoint_folder(model, settings.cache_dir)
        warm_page_cache(folder)
        weights = weight_bytes_of_folder(folder, elem)
        extra = set() if settings.gpu else {"qwen2-0.5b-shape"}
        tools = ["ours"] + [p for p in settings.peers_for(model, extra) if p in ("hf_sdpa", "tl", "bridge", "nnsight")]
        sources = {t: folder for t in tools}
        if model == SMOLLM2 and settings.size == "full":
            from hookedcot.embedded import embedded_model_path

            gguf = embedded_model_path(SMOLLM2)
            sources["ours_gguf"] = gguf
            if "hf_sdpa" in tools:
                sources["hf_gguf"] = gguf
        runs: dict[str, list[dict]] = {t: [] for t in sources}
        rounds = ROUNDS[settings.size] if is_smollm2(model) and not settings.gpu else 1
        for r in range(rounds):
            order = list(sources)[r % len(sources):] + list(sources)[: r % len(sources)]
            for tool in order:
                log(f"loading {short(model)} {tool}")
                runs[tool].append(spawn(tool, sources[tool], settings))
        ref_times = {name: [x["load_s"] + x["first_forward_s"] for x in runs.get(name, []) if "error" not in x]
                     for name in ("hf_sdpa", "hf_gguf")}
        for tool, samples in runs.items():
            ok = [x for x in samples if "error" not in x]
            if not ok:
                skipped.append({"model": short(model), "tool": tool, "reason": samples[0]["error"]})
                continue
            peak = max(x["peak_rss"] for x in ok)
            peak_fwd = max(x["peak_rss_after_forward"] for x in ok)
            ready = [x["load_s"] + x["first_forward_s"] for x in ok]
            before = min(x["rss_before_load"] for x in ok)
            ref = ref_times["hf_gguf" if "gguf" in tool else "hf_sdpa"]  # GGUF rows against HF's GGUF load
            rows.append({
                "model": short(model), "tool": tool, "label": LABELS[tool], "source": "GGUF" if "gguf" in tool else "safetensors",
                "weight_MiB": weights / 2**20, "load_time_s": stats([x["load_s"] for x in ok]),
                **{key: stats([x[key] for x in ok])["median"] for key in SECONDS},
                "seconds": {key: stats([x[key] for x in ok]) for key in SECONDS},  # median, min, max, n
                "load_and_forward_s": stats(ready)["median"],
                "x_hf_time": paired_ratio(ready, ref) if len(ref) == len(ok) else None,
                "rss_before_MiB": before / 2**20, "peak_rss_MiB": peak / 2**20,
                "load_x_weights": (peak - before) / weights, "peak_x_weights": peak / weights,
                "with_forward_x_weights": (peak_fwd - before) / weights,
                "gpu_peak_x_weights": (max(x["gpu_peak_after_forward"] for x in ok) / weights
                                       if ok[0].get("gpu_peak_after_forward") is not None else None),
            })
            if tool == "ours" and rows[-1]["gpu_peak_x_weights"] is not None:
                ratio = rows[-1]["gpu_peak_x_weights"]
                budgets.append({"budget": "loading onto the GPU: peak GPU memory ≤ 1.05 × weight bytes (load + first forward)",
                                "model": short(model), "shape": settings.dtype_name, "ratio": ratio, "limit": BUDGET,
                                "verdict": budget_verdict(ratio, BUDGET, False)})
            if tool == "ours":
                ratio = (peak_fwd - before) / weights
                budgets.append({"budget": "loading: peak RSS ≤ 1.05 × weight bytes (RSS added by load + first forward)",
                                "model": short(model), "shape": settings.dtype_name, "ratio": ratio, "limit": BUDGET,
                                "verdict": budget_verdict(ratio, BUDGET, False)})
    notes.append("load_x_weights = (child's peak RSS right after loading − its RSS after imports) / weight bytes in "
                 "the target dtype; with_forward_x_weights = the same through one 4-token forward (transformers maps "
                 "the files and reads the pages only when a forward touches them, so its load-time RSS is not the "
                 "memory the model costs); peak_x_weights = peak after loading, imports included. TL's load is "
                 "TransformerLens' real path: transformers loads the model, then TL converts its state dict. "
                 "x HF time: (load + first forward) over transformers' (load + first forward), median over rounds. "
                 "Times, each child: torch_import_s = `import torch`; import_s = then importing the tool "
                 "(`from hookedcot import HookedCoT`, `from transformers import AutoModelForCausalLM`; transformers "
                 "imports its model classes lazily, so that part lands in load_s); load_s = the first load; "
                 "load_again_s = a second load in the same child, every module imported: the load alone. "
                 "hookedcot's child does not call retain_freed_memory: the load a user gets by default."
                 + (" gpu_peak_x_weights: torch.cuda.max_memory_allocated through load and first forward / weight "
                    "bytes; transformers loads with device_map (straight onto the GPU)." if settings.gpu else ""))
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "label", "source", "weight_MiB", "torch_import_s", "import_s", "load_s", "load_again_s",
                 "load_and_forward_s", "x_hf_time",
                 "rss_before_MiB", "peak_rss_MiB", "load_x_weights", "with_forward_x_weights", "peak_x_weights",
                 "gpu_peak_x_weights"]


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
