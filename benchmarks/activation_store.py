"""Question 8: what does recording activations to disk cost beside the forward a user runs anyway?

`hookedcot.dictionaries.collect_activations` over a dataset of sequences (64 × 256 tokens in the
full pass, batches of 8), everything included: tokenization of the ids, hooks, copying the kept
activations out, writing the safetensors shards and the manifest. The baselines are the loops a
user writes over the same batches: `model(batch)` (logits) and `model(batch, return_type=None)`
(no unembedding, the stricter one). Two hooks are timed: the residual after the LAST block (the
whole depth runs: the strict case, the headline) and after the middle block (collection stops
there, as seed 003's layer-12 store does). The budget (≤ 1.15 × the plain forward) is read on
the strict case against the forward without logits.

hookedcot runs in a process of its own (`benchmarks.processes`), the cases interleaved round by
round after a warm-up round; a ratio is the median of the per-round ratios. Each collection
writes into a fresh temporary folder, removed after the round.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile

import torch

from benchmarks.common import (
    Settings, budget_verdict, checkpoint_folder, checkpoint_shape, interleaved, log, paired_ratio, random_tokens,
    result, short, stats,
)
from benchmarks.processes import close, start_tool

NAME = "activation_store"
SHAPES = {"full": (64, 256), "quick": (32, 128), "tiny": (4, 8)}  # (sequences, tokens each)
BATCH = {"full": 8, "quick": 8, "tiny": 2}
REPS = {"full": 3, "quick": 2, "tiny": 1}
BUDGET = 1.15
SKIP_BY_DEFAULT = {"qwen2-0.5b-shape", "llama3.2-1b-shape"}


def cases(n_layers: int) -> dict[str, str | None]:
    """case -> the hook it collects (None: a plain forward)."""
    return {"plain forward, logits": None, "plain forward, no logits": None,
            "collect last block": f"blocks.{n_layers - 1}.hook_resid_post",
            "collect middle block": f"blocks.{n_layers // 2}.hook_resid_post"}


def run_case(tool, case: str, hook: str | None, sequences: torch.Tensor, batch: int) -> None:
    """One pass over the dataset, in hookedcot's process."""
    model = getattr(tool, "model", tool)
    device = model.device
    if hook is None:
        return_type = "logits" if case.endswith(", logits") else None
        with torch.inference_mode():
            for lo in range(0, len(sequences), batch):
                model(sequences[lo : lo + batch].to(device), return_type=return_type)
        return
    from hookedcot.dictionaries.store import collect_activations

    folder = tempfile.mkdtemp(prefix="hookedcot-store-bench-")
    try:
        collect_activations(model, list(sequences), hook, folder, batch_size=batch, max_length=None, progress=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    for model in settings.models_for(set() if settings.gpu else SKIP_BY_DEFAULT):
        folder = checkpoint_folder(model, settings.cache_dir)
        n_layers, vocab = checkpoint_shape(folder)
        n_seq, length = SHAPES[settings.size]
        sequences = random_tokens(n_seq, length, vocab, seed=8)
        batch = BATCH[settings.size]
        ours = start_tool("ours", folder, settings)
        chosen = cases(n_layers)
        log(f"{NAME} {short(model)} {n_seq}×{length} tokens: timing")
        fns = {case: (lambda case=case, hook=hook: ours.run(run_case, case, hook, sequences, batch))
               for case, hook in chosen.items()}
        times = interleaved(fns, reps=REPS[settings.size], warmup=1, device=settings.device)
        close(ours)
        logits, no_logits = times["plain forward, logits"], times["plain forward, no logits"]
        for case, samples in times.items():
            rows.append({"model": short(model), "tool": "ours", "case": case, "hook": chosen[case] or "—",
                         "tokens": n_seq * length,
                         "time_s": stats(samples), "median_s": statistics.median(samples),
                         "tokens_per_s": n_seq * length / statistics.median(samples),
                         "x_plain_logits": paired_ratio(samples, logits),
                         "x_plain_no_logits": paired_ratio(samples, no_logits)})
        strict = next(r for r in rows if r["model"] == short(model) and r["case"] == "collect last block")
        budgets.append({"budget": "collect_activations ≤ 1.15 × the plain forward (last block's residual vs a forward "
                                  "without logits)", "model": short(model), "shape": f"{n_seq}×{length}, batch {batch}",
                        "ratio": strict["x_plain_no_logits"], "limit": BUDGET,
                        "verdict": budget_verdict(strict["x_plain_no_logits"], BUDGET, False)})
    notes.append("x_plain_logits / x_plain_no_logits: the case's time over a loop of plain forwards over the same "
                 "batches, with logits / with return_type=None, median over interleaved rounds. A collection includes "
                 "writing its shards (fp32) to a temporary folder.")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "case", "hook", "tokens", "median_s", "tokens_per_s", "x_plain_logits", "x_plain_no_logits"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
