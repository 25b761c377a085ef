"""Where a GPU load's memory goes: the weights, then what the first forward adds (cuBLAS's
workspace, taken through torch's allocator on the first matmul), for hookedcot and transformers.
The workspace is allocated once per process, so only the first tool measured in a process pays
it: name one tool per run to see it for each.
Run: python -m benchmarks.gpu_memory CHECKPOINT_FOLDER [dtype] [hookedcot,transformers]"""

from __future__ import annotations

import sys

import torch


def report(folder: str, dtype_name: str = "bfloat16", tools: str = "hookedcot,transformers") -> None:
    from transformers import AutoModelForCausalLM

    from hookedcot import HookedCoT

    dtype = getattr(torch, dtype_name)
    tokens = torch.tensor([[5, 6, 7, 8]], device="cuda")
    loaders = {"hookedcot": lambda: HookedCoT.from_pretrained(folder, dtype=dtype, device="cuda"),
               "transformers": lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cuda")}
    for name in tools.split(","):
        load = loaders[name]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = load()
        torch.cuda.synchronize()
        weights = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
        after_load = torch.cuda.max_memory_allocated() - base
        with torch.inference_mode():
            model(tokens) if name == "hookedcot" else model(input_ids=tokens)
        torch.cuda.synchronize()
        after_forward = torch.cuda.max_memory_allocated() - base
        print(f"{name}: weights {weights / 2**20:.1f} MiB; peak after load {after_load / 2**20:.1f} MiB "
              f"({after_load / weights:.3f} x); after first forward {after_forward / 2**20:.1f} MiB "
              f"({after_forward / weights:.3f} x, +{(after_forward - after_load) / 2**20:.1f} MiB)", flush=True)
        del model


if __name__ == "__main__":
    report(*sys.argv[1:])
