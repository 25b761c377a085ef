"""Question 5: our forward's achieved FLOP/s as a fraction of this machine's matmul throughput.

Peak: `torch.matmul` of two large square matrices in the same dtype (2·N³ FLOPs per call).
Forward FLOPs: 2 · (every matmul weight: q/k/v/o, gate/up/down, the unembedding) · tokens, plus
attention: QKᵀ and PV over the causal triangle, 2 · b · layers · heads · d_head · p · (p + 1).
Embedding lookups, norms, rotary and softmax are not counted (they are not FLOP-bound).
Matmul and forward calls are interleaved; the fraction is the median over rounds. The forwards run
in the tools' own processes (`benchmarks.processes`), the matmul in the parent, one at a time.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    log, short,
    Settings, budget_verdict, is_smollm2, checkpoint_folder, checkpoint_shape, interleaved, random_tokens, result,
    stats,
)
from benchmarks.peers import LABELS
from benchmarks.processes import close, start_reference, start_tool

NAME = "roofline"
SHAPE = {"full": (8, 128), "quick": (2, 128), "tiny": (1, 8)}
MATMUL_N = {"full": 2048, "quick": 2048, "tiny": 64}
# A GPU needs far more tokens to be busy, and a far bigger product to reach its peak.
GPU_SHAPE, GPU_MATMUL_N = {"full": (16, 1024), "quick": (8, 512), "tiny": (1, 8)}, {"full": 8192, "quick": 8192, "tiny": 64}
GPU_REPS = 10
REPS = {"full": 3, "quick": 3, "tiny": 1}
BUDGET, AIM = 0.6, 0.85
SKIP_BY_DEFAULT = {"llama3.2-1b-shape"}  # about a minute per 8×128 forward on 2 cores


def forward_flops(tool, batch: int, pos: int) -> float:
    """Run in hookedcot's process (`ToolProcess.run`)."""
    model = tool.model
    cfg = model.cfg
    matmul_params = sum(
        mod.weight.numel() for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    )
    attention = 2 * batch * cfg.n_layers * cfg.n_heads * cfg.d_head * pos * (pos + 1)
    return 2.0 * matmul_params * batch * pos + attention


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    n = (GPU_MATMUL_N if settings.gpu else MATMUL_N)[settings.size]
    a = torch.randn(n, n, dtype=settings.dtype, device=settings.device)
    b_ = torch.randn(n, n, dtype=settings.dtype, device=settings.device)
    matmul_flops = 2.0 * n**3
    models = settings.models_for(set() if settings.gpu else SKIP_BY_DEFAULT)
    if settings.size == "quick" and not settings.models_explicit:
        models = [m for m in models if is_smollm2(m)] or models[:1]
    for model in models:
        folder = checkpoint_folder(model, settings.cache_dir)
        ours = start_tool("ours", folder, settings)
        batch, pos = (GPU_SHAPE if settings.gpu else SHAPE)[settings.size]
        tokens = random_tokens(batch, pos, checkpoint_shape(folder)[1]).to(settings.device)
        flops = ours.run(forward_flops, batch, pos)
        ref = start_reference(folder, settings, model, skipped)
        fns = {"matmul": lambda: torch.matmul(a, b_),
               **{name: tool.forward_cases(tokens)["plain"] for name, tool in (("ours", ours), ("hf_sdpa", ref)) if tool}}
        log(f"roofline {short(model)} {batch}×{pos}")
        reps = GPU_REPS if settings.gpu and settings.size != "tiny" else REPS[settings.size]
        times = interleaved(fns, reps=reps, warmup=2 if settings.gpu else 1, device=settings.device)
        peak = [matmul_flops / t for t in times["matmul"]]
        rows.append({"model": short(model), "tool": "matmul", "label": f"torch.matmul {n}×{n}", "shape": f"{n}×{n}",
                     "time_s": stats(times["matmul"]), "gflops": stats(peak)["median"] / 1e9, "fraction_of_peak": 1.0})
        for tool in [t for t in fns if t != "matmul"]:
            achieved = [flops / t for t in times[tool]]
            fraction = stats([f / p for f, p in zip(achieved, peak)])["median"]
            rows.append({"model": short(model), "tool": tool, "label": LABELS[tool], "shape": f"{batch}×{pos}",
                         "time_s": stats(times[tool]), "gflop_per_forward": flops / 1e9,
                         "gflops": stats(achieved)["median"] / 1e9, "fraction_of_peak": fraction})
            if tool == "ours":
                budgets.append({"budget": f"roofline ≥ {BUDGET} of matmul peak (aim {AIM})", "model": short(model),
                                "shape": f"{batch}×{pos}", "ratio": fraction, "limit": BUDGET,
                                "verdict": budget_verdict(fraction, BUDGET, True)})
        fns.clear()
        close(ours, ref)
    notes.append(f"Peak = torch.matmul of two {n}×{n} {settings.dtype_name} matrices, interleaved with the forwards; "
                 "fraction = median over rounds of (forward FLOP/s ÷ that round's matmul FLOP/s).")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "label", "shape", "gflop_per_forward", "gflops", "fraction_of_peak"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
