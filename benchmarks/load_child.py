"""One tool's load in a fresh interpreter, for `benchmarks/loading.py`: import torch, import the
tool, load, one forward, load again; prints one JSON line. Nothing but the standard library is
imported before the clock starts, so the import times are the ones a user's script pays.
Run by hand: `python -m benchmarks.load_child TOOL SOURCE DTYPE [THREADS] [DEVICE]`
(TOOL: ours, ours_gguf, hf_sdpa, hf_gguf, tl, bridge, nnsight)."""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path


def status_bytes(field: str) -> int:
    """A /proc/self/status size field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux, exec records the forked parent's
    high-water mark into the child's ru_maxrss, so a child of a big benchmark process would
    report the parent's size (seen: every tool at the parent's 2.8 GiB)."""
    hwm = status_bytes("VmHWM")
    return hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(tool: str, source: str, dtype_name: str, threads: int, device: str = "cpu") -> dict:
    """Runs in the fresh process: import, measure, load, measure, then load a second time (imports
    and lazily imported modules warm: the load alone)."""
    t_torch = time.perf_counter()
    import torch

    torch_import_s = time.perf_counter() - t_torch

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    gpu = device.startswith("cuda")
    if gpu:
        torch.zeros(1, device=device)  # the CUDA context is not the load's cost
    done = (lambda: torch.cuda.synchronize()) if gpu else (lambda: None)  # noqa: E731
    t0 = time.perf_counter()
    if tool in ("ours", "ours_gguf"):
        from hookedcot import HookedCoT

        load = lambda: HookedCoT.from_pretrained(source, dtype=dtype, device=device)  # noqa: E731
    elif tool in ("hf_sdpa", "hf_gguf"):
        from transformers import AutoModelForCausalLM

        # device_map puts each tensor on the GPU as it is read: transformers' own lean path
        to = {"device_map": device} if gpu else {}
        if tool == "hf_gguf":
            path = Path(source)
            load = lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **to)  # noqa: E731
        else:
            load = lambda: AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **to)  # noqa: E731
    else:
        from benchmarks.peers import load_tool

        load = lambda: load_tool(tool, Path(source), dtype, device)  # noqa: E731  (TL's path loads HF first)
    import_s = time.perf_counter() - t0
    before = status_bytes("VmRSS")
    t1 = time.perf_counter()
    model = load()
    done()
    load_s = time.perf_counter() - t1
    peak = _peak_rss_bytes()
    gpu_peak = torch.cuda.max_memory_allocated() if gpu else None
    # transformers maps safetensors files and reads pages when the forward first touches them: its
    # load-time RSS is low and the cost moves to the first forward. Measure through one forward.
    t2 = time.perf_counter()
    with torch.inference_mode():
        _first_forward(model, torch.tensor([[5, 6, 7, 8]], device=device))
    done()
    forward_s = time.perf_counter() - t2
    out = {"torch_import_s": torch_import_s, "import_s": import_s, "load_s": load_s, "first_forward_s": forward_s,
           "rss_before_load": before, "peak_rss": peak, "peak_rss_after_forward": _peak_rss_bytes(),
           "gpu_peak_after_load": gpu_peak, "gpu_peak_after_forward": torch.cuda.max_memory_allocated() if gpu else None}
    del model
    gc.collect()
    t3 = time.perf_counter()
    load()
    done()
    return out | {"load_again_s": time.perf_counter() - t3}


def _first_forward(model, tokens):
    if hasattr(model, "last_logits"):  # a benchmarks.peers Tool
        return model.last_logits(tokens)
    if hasattr(model, "hook_names"):  # HookedCoT
        return model(tokens)
    return model(input_ids=tokens, use_cache=False).logits


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0,
                            *sys.argv[5:6])))
