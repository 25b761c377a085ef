"""Question 3: a layer × position activation-patching sweep (resid_pre, a 64-token prompt, KL at
the last position): our batched `patch_layer_position` against the naive loops a user would write.

Naive loops: one clean run to capture resid_pre, one corrupted run for the baseline, then patched
forwards computing the last position's logits only, either one site a forward (batch 1) or, as a
user would batch them, NAIVE_BATCH sites of one layer a forward (one batch row per site). Tools:
hookedcot and TransformerLens (`run_with_hooks` and a hand-written hook), transformers (a forward
pre-hook on the decoder layer), nnsight (assigning the layer's input; batch 1 only). Every tool runs
in a process of its own (`benchmarks.processes`) and times itself there.

The naive loops run on a sample of sites and are extrapolated to the grid (clean and baseline runs
+ n_sites × the per-site time); their values on the sample are checked against the sweep's. Each
round runs the sweep and every naive loop once, in a rotated order; ratios are the median over
rounds of (naive grid time / sweep time) with their range. Peers other than HF run after the first
group, beside HF's batch-1 loop, and are scaled by HF's per-site time from the first group. The big
random-shape models sweep every LAYER_STRIDE-th layer and POS_STRIDE-th position (SmolLM2 every
third layer, every position): the same per-site mix of layers and positions, fewer sites.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import (
    log, short,
    Settings, budget_verdict, is_smollm2, checkpoint_folder, checkpoint_shape, interleaved, random_tokens, result,
    stats, sync,
)
from benchmarks.peers import LABELS, Unavailable
from benchmarks.processes import close, start_reference, start_tool

NAME = "patching_sweep"
PROMPT_LEN = {"full": 64, "quick": 64, "tiny": 6}
N_SAMPLE = {"full": 8, "quick": 4, "tiny": 2}  # batch-1 sites a round; the batched loop runs N_SAMPLE // 4 forwards
ROUNDS = {"full": 5, "quick": 3, "tiny": 2}
NAIVE_BATCH = 8
LAYER_STRIDE = {"full": 6, "quick": 8, "tiny": 1}  # for models other than SmolLM2
SMOL_LAYER_STRIDE = {"full": 3, "quick": 3, "tiny": 1}
POS_STRIDE = {"full": 4, "quick": 4, "tiny": 1}  # for models other than SmolLM2
BUDGET = 10.0
SKIP_BY_DEFAULT = {"llama3.2-1b-shape"}  # name it in --models to run it


def make_pair(vocab: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    clean = random_tokens(1, n, vocab, seed=3)
    corrupted = clean.clone()
    for p in range(n // 6, n - 1, max(1, n // 4)):  # a few positions differ, as in a name / number swap
        corrupted[0, p] = (clean[0, p] + 17) % max(4, min(vocab, 30000) - 1) + 3
    return clean, corrupted


def sweep_in_process(tool, clean, corrupted, layers: list[int], positions: list[int], device: str) -> dict:
    """Run in hookedcot's process: the batched sweep, timed there."""
    from hookedcot.interp.sweeps import patch_layer_position

    sync(device)
    t0 = time.perf_counter()
    res = patch_layer_position(tool.model, clean, corrupted, layers=layers, positions=positions, progress=False)
    sync(device)
    return {"s": time.perf_counter() - t0, "values": res.values.float().cpu()}


def naive_in_process(tool, clean, corrupted, chunks: list[tuple[int, list[int]]], device: str) -> dict:
    """Run in the tool's process: a user's loop over `chunks` [(layer, positions)], one patched
    forward a chunk (one batch row a position). -> clean + baseline seconds, seconds a site, KL values."""
    sync(device)
    t0 = time.perf_counter()
    acts = tool.resid_pre(clean)
    if isinstance(acts, str):
        raise Unavailable(acts)
    base = tool.last_logits(corrupted).float().log_softmax(-1)
    sync(device)
    t1 = time.perf_counter()
    values = []
    for layer, positions in chunks:
        logits = tool.patched_last_logits(corrupted, layer, positions, acts[layer][0, positions])
        if isinstance(logits, str):
            raise Unavailable(logits)
        logp = logits.float().log_softmax(-1)
        values += (logp.exp() * (logp - base)).sum(-1).tolist()
    sync(device)
    return {"prep_s": t1 - t0, "per_site_s": (time.perf_counter() - t1) / len(values), "values": values}


def timed_rounds(jobs: dict, rounds: int) -> dict[str, list[dict]]:
    """Each job once a round, rounds interleaved (rotating who goes first); the warm-up round's
    results dropped. A job that fails in warm-up is left out: {key: reason} under "__failed__"."""
    out: dict[str, list[dict]] = {key: [] for key in jobs}
    failures: dict[str, str] = {}
    interleaved({k: (lambda k=k: out[k].append(jobs[k]())) for k in jobs}, reps=rounds, warmup=1, failures=failures)
    return {k: v[1:] for k, v in out.items() if k not in failures} | {"__failed__": failures}


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    size, device = settings.size, settings.device
    for model in settings.models_for(set() if settings.gpu else SKIP_BY_DEFAULT):
        folder = checkpoint_folder(model, settings.cache_dir)
        n_layers, vocab = checkpoint_shape(folder)
        stride = (SMOL_LAYER_STRIDE if is_smollm2(model) else LAYER_STRIDE)[size]
        every_site = settings.gpu or is_smollm2(model)  # a GPU sweeps the whole grid of every model
        layers = list(range(0, n_layers, 1 if settings.gpu and size == "full" else stride))
        clean, corrupted = make_pair(vocab, PROMPT_LEN[size])
        n_pos = clean.shape[1]
        positions = list(range(0, n_pos, 1 if every_site else POS_STRIDE[size]))
        n_sites = len(layers) * len(positions)
        gen = torch.Generator().manual_seed(4)
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
        batch_1 = [(pick(layers), [pick(positions)]) for _ in range(N_SAMPLE[size])]
        k = min(NAIVE_BATCH, len(positions))
        batched = [(pick(layers), [positions[int(i)] for i in torch.randperm(len(positions), generator=gen)[:k]])
                   for _ in range(max(1, N_SAMPLE[size] // 4))]
        samples = {"batch 1": batch_1, f"batch {k}": batched}

        log(f"patching sweep {short(model)}: {n_sites} sites, {ROUNDS[size]} rounds")
        ours = start_tool("ours", folder, settings)
        ref = start_reference(folder, settings, model, skipped)
        group = {"ours": ours, **({"hf_sdpa": ref} if ref else {})}
        jobs = {"sweep": lambda: ours.run(sweep_in_process, clean, corrupted, layers, positions, device)}
        jobs |= {f"{name}:{case}": (lambda t=tool, c=chunks: t.run(naive_in_process, clean, corrupted, c, device))
                 for name, tool in group.items() for case, chunks in samples.items()}
        runs = timed_rounds(jobs, ROUNDS[size])
        sweep_values = runs["sweep"][-1]["values"]
        sweep_s = [r["s"] for r in runs["sweep"]]

        def naive_row(key: str, records: list[dict], scale: list[float] | None = None) -> dict:
            tool, case = key.split(":")
            chunks = samples[case]
            scale = scale or [1.0] * len(records)
            grids = [r["prep_s"] + n_sites * r["per_site_s"] * f for r, f in zip(records, scale)]
            speedups = stats([g / s for g, s in zip(grids, sweep_s)])
            sampled = [(layer, p) for layer, ps in chunks for p in ps]
            expected = [float(sweep_values[layers.index(layer), positions.index(p)]) for layer, p in sampled]
            return {"model": short(model), "tool": tool, "label": f"{LABELS[tool]} naive loop, {case}",
                    "sites": n_sites, "sampled_sites": len(sampled),
                    "per_site_ms": 1e3 * statistics.median(r["per_site_s"] * f for r, f in zip(records, scale)),
                    "grid_s": statistics.median(grids), "sites_per_s": n_sites / statistics.median(grids),
                    "sweep_speedup": speedups["median"], "speedup_range": f"{speedups['min']:.3g}–{speedups['max']:.3g}",
                    "speedup": speedups,
                    "max_abs_diff_vs_sweep": max(abs(a - b) for a, b in zip(records[-1]["values"], expected))}

        rows.append({"model": short(model), "tool": "ours", "label": "hookedcot patch_layer_position (batched)",
                     "sites": n_sites, "layers": len(layers), "positions": len(positions), "time_s": stats(sweep_s),
                     "grid_s": statistics.median(sweep_s), "sites_per_s": n_sites / statistics.median(sweep_s),
                     "sweep_speedup": 1.0})
        for key, reason in runs.pop("__failed__").items():
            skipped.append({"model": short(model), "tool": key.split(":")[0], "case": key.split(":")[-1], "reason": reason})
        rows += [naive_row(key, records) for key, records in runs.items() if key != "sweep"]
        for peer in [p for p in settings.peers_for(model) if p in ("tl", "bridge", "nnsight")]:
            try:
                tool = start_tool(peer, folder, settings)
            except Unavailable as why:
                skipped.append({"model": short(model), "tool": peer, "reason": str(why)})
                continue
            beside = {key: (lambda t=t: t.run(naive_in_process, clean, corrupted, batch_1, device))
                      for key, t in ((f"{peer}:batch 1", tool), ("hf_sdpa:batch 1", ref)) if t is not None}
            peer_runs = timed_rounds(beside, ROUNDS[size])
            for key, reason in peer_runs.pop("__failed__").items():
                skipped.append({"model": short(model), "tool": key.split(":")[0], "reason": reason})
            if f"{peer}:batch 1" in peer_runs:
                hf_main = [r["per_site_s"] for r in runs.get("hf_sdpa:batch 1", [])]
                hf_beside = [r["per_site_s"] for r in peer_runs.get("hf_sdpa:batch 1", [])]
                scale = [statistics.median(hf_main) / h for h in hf_beside] if hf_main and hf_beside else None
                rows.append(naive_row(f"{peer}:batch 1", peer_runs[f"{peer}:batch 1"], scale))
            tool.close()
        fastest = min((r for r in rows if r["model"] == short(model) and "naive" in r["label"]), key=lambda r: r["grid_s"])
        budgets.append({"budget": "patching sweep ≥ 10 × the fastest naive loop's patched forwards/s", "model": short(model),
                        "shape": f"{len(layers)} layers × {len(positions)} positions (vs {fastest['label']})",
                        "ratio": fastest["sweep_speedup"], "limit": BUDGET,
                        "verdict": budget_verdict(fastest["sweep_speedup"], BUDGET, True)})
        close(ours, ref)
    notes.append(f"Naive loops are timed on a sample of sites each round ({N_SAMPLE[size]} at batch 1, "
                 f"{max(1, N_SAMPLE[size] // 4)} forwards of up to {NAIVE_BATCH} sites of one layer batched) and "
                 "extrapolated: grid time = clean and baseline runs + sites × per-site time. sweep_speedup: median "
                 f"over {ROUNDS[size]} interleaved rounds of naive grid time / sweep time (speedup_range: min–max). "
                 "Peers other than HF are timed beside HF's batch-1 loop and scaled by HF's per-site time of the first "
                 "group. max_abs_diff_vs_sweep: the naive loop's KL values against the batched sweep's on the sample.")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "label", "sites", "per_site_ms", "grid_s", "sites_per_s", "sweep_speedup", "speedup_range",
                 "max_abs_diff_vs_sweep"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
