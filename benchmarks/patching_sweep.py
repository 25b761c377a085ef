"""Question 3: a layer × position activation-patching sweep (resid_pre, a 64-token prompt, KL at
the last position): our batched `patch_layer_position` against one hooked forward per site.

Naive loops: our `naive_patch_loop`, transformers forward pre-hooks, TransformerLens
`run_with_hooks` (HookedTransformer and Bridge) and an nnsight trace that assigns the layer's
input. They run on a sample of sites and are extrapolated to the grid (clean run + n_sites × the
per-site time); their values on the sample are checked against the sweep's. The big random-shape
models sweep every LAYER_STRIDE-th layer and POS_STRIDE-th position (SmolLM2 every third layer, every
position): the same per-site mix of layers and positions, fewer sites.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import (
    log, short,
    Settings, budget_verdict, is_smollm2, checkpoint_folder, free_memory, random_tokens, result, stats, sync,
)
from benchmarks.peers import LABELS, Unavailable, load_reference, load_tool

NAME = "patching_sweep"
PROMPT_LEN = {"full": 64, "quick": 64, "tiny": 6}
N_SAMPLE = {"full": 8, "quick": 4, "tiny": 2}
ROUNDS = {"full": 1, "quick": 1, "tiny": 1}
LAYER_STRIDE = {"full": 6, "quick": 8, "tiny": 1}  # for models other than SmolLM2
SMOL_LAYER_STRIDE = {"full": 3, "quick": 3, "tiny": 1}
POS_STRIDE = {"full": 4, "quick": 4, "tiny": 1}  # for models other than SmolLM2
BUDGET = 10.0
SKIP_BY_DEFAULT = {"llama3.2-1b-shape"}  # name it in --models to run it


def kl_last(logits: torch.Tensor, base_logp: torch.Tensor) -> float:
    logp = logits.float().log_softmax(-1)
    return float((logp.exp() * (logp - base_logp)).sum(-1))


def make_pair(vocab: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    clean = random_tokens(1, n, vocab, seed=3)
    corrupted = clean.clone()
    for p in range(n // 6, n - 1, max(1, n // 4)):  # a few positions differ, as in a name / number swap
        corrupted[0, p] = (clean[0, p] + 17) % max(4, min(vocab, 30000) - 1) + 3
    return clean, corrupted


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@torch.inference_mode()
def naive_peer(tool, clean, corrupted, sites, device) -> dict:
    """A peer's naive loop on `sites`: clean capture once, then one patched forward per site."""
    t_clean, acts = timed(lambda: tool.resid_pre(clean), device)
    if isinstance(acts, str):
        raise Unavailable(acts)
    base = tool.last_logits(corrupted).float().log_softmax(-1)
    values, t0 = [], time.perf_counter()
    for layer, pos in sites:
        values.append(kl_last(tool.patched_last_logits(corrupted, layer, pos, acts[layer][0, pos]), base))
    sync(device)
    return {"clean_s": t_clean, "per_site_s": (time.perf_counter() - t0) / len(sites), "values": values}


@torch.inference_mode()
def naive_ours(model, clean, corrupted, sites, device) -> dict:
    from hookedcot.interp.patching import Site
    from hookedcot.interp.sweeps import naive_patch_loop

    base = model(corrupted)[:, -1:].float().log_softmax(-1)

    def metric(logits):
        logp = logits.float().log_softmax(-1)
        return (logp.exp() * (logp - base)).sum(-1).sum(-1)

    names = sorted({f"blocks.{layer}.hook_resid_pre" for layer, _ in sites})
    t_clean, _ = timed(lambda: model.run_with_cache(clean, names_filter=names), device)
    ours_sites = [Site(f"blocks.{layer}.hook_resid_pre", (pos,)) for layer, pos in sites]
    t_all, values = timed(lambda: naive_patch_loop(model, clean, corrupted, ours_sites, metric, progress=False), device)
    return {"clean_s": t_clean, "per_site_s": max(t_all - t_clean, 1e-9) / len(sites), "values": values.tolist()}


def run(settings: Settings) -> dict:
    from hookedcot.interp.sweeps import patch_layer_position

    rows, skipped, notes, budgets = [], [], [], []
    size = settings.size
    for model in settings.models_for(set() if settings.gpu else SKIP_BY_DEFAULT):
        folder = checkpoint_folder(model, settings.cache_dir)
        ours = load_tool("ours", folder, settings.dtype, settings.device)
        m = ours.model
        n_layers = m.cfg.n_layers
        stride = (SMOL_LAYER_STRIDE if is_smollm2(model) else LAYER_STRIDE)[size]
        every_site = settings.gpu or is_smollm2(model)  # a GPU sweeps the whole grid of every model
        layers = list(range(0, n_layers, 1 if settings.gpu and size == "full" else stride))
        clean, corrupted = (t.to(settings.device) for t in make_pair(m.cfg.d_vocab, PROMPT_LEN[size]))
        n_pos = clean.shape[1]
        positions = list(range(0, n_pos, 1 if every_site else POS_STRIDE[size]))
        n_sites = len(layers) * len(positions)
        gen = torch.Generator().manual_seed(4)
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
        sample = [(pick(layers), pick(positions)) for _ in range(N_SAMPLE[size])]
        ref = load_reference(folder, settings, model, skipped)

        log(f"patching sweep {short(model)}: {n_sites} sites")
        sweep_times: list[float] = []
        naive: dict[str, list[dict]] = {"ours": [], "hf_sdpa": []}
        values = None
        with torch.inference_mode():
            patch_layer_position(m, clean, corrupted, layers=layers[:1], positions=[0, 1], progress=False)  # warm-up
        for _ in range(ROUNDS[size]):
            t, res = timed(lambda: patch_layer_position(m, clean, corrupted, layers=layers, positions=positions, progress=False), settings.device)
            sweep_times.append(t)
            values = res.values
            naive["ours"].append(naive_ours(m, clean, corrupted, sample, settings.device))
            if ref is not None:
                naive["hf_sdpa"].append(naive_peer(ref, clean, corrupted, sample, settings.device))
        sweep_s = stats(sweep_times)["median"]
        sweep_vals = [float(values[layers.index(layer), positions.index(pos)]) for layer, pos in sample]

        def naive_row(tool: str, runs: list[dict], scale: float = 1.0) -> dict:
            per_site = stats([r["per_site_s"] for r in runs])["median"] * scale
            clean_s = stats([r["clean_s"] for r in runs])["median"]
            grid_s = clean_s + n_sites * per_site
            diff = max(abs(a - b) for a, b in zip(runs[-1]["values"], sweep_vals))
            return {"model": short(model), "tool": tool, "label": LABELS[tool] + " naive loop", "sites": n_sites,
                    "sampled_sites": len(sample), "per_site_ms": 1e3 * per_site, "grid_s": grid_s,
                    "sites_per_s": n_sites / grid_s, "sweep_speedup": grid_s / sweep_s, "max_abs_diff_vs_sweep": diff}

        rows.append({"model": short(model), "tool": "ours", "label": "hookedcot patch_layer_position (batched)",
                     "sites": n_sites, "layers": len(layers), "positions": len(positions), "time_s": stats(sweep_times),
                     "grid_s": sweep_s, "sites_per_s": n_sites / sweep_s, "sweep_speedup": 1.0})
        rows.append(naive_row("ours", naive["ours"]))
        hf_per_site = None
        if naive["hf_sdpa"]:
            rows.append(naive_row("hf_sdpa", naive["hf_sdpa"]))
            hf_per_site = stats([r["per_site_s"] for r in naive["hf_sdpa"]])["median"]
        for peer in [p for p in settings.peers_for(model) if p in ("tl", "bridge", "nnsight")]:
            try:
                tool = load_tool(peer, folder, settings.dtype, settings.device, ref=ref)
                peer_run = naive_peer(tool, clean, corrupted, sample, settings.device)
                scale = 1.0
                if ref is not None:  # re-time HF beside the peer; carry the peer's ratio to HF over
                    hf_again = naive_peer(ref, clean, corrupted, sample, settings.device)
                    scale = hf_per_site / hf_again["per_site_s"]
                rows.append(naive_row(peer, [peer_run], scale))
                del tool
            except Unavailable as why:
                skipped.append({"model": short(model), "tool": peer, "reason": str(why)})
            free_memory()
        naive_rows = [r for r in rows if r["model"] == short(model) and "naive" in r["label"]]
        fastest = min(naive_rows, key=lambda r: r["grid_s"])
        budgets.append({"budget": "patching sweep ≥ 10 × the fastest naive loop's patched forwards/s", "model": short(model),
                        "shape": f"{len(layers)} layers × {len(positions)} positions (vs {fastest['label']})",
                        "ratio": fastest["sweep_speedup"], "limit": BUDGET,
                        "verdict": budget_verdict(fastest["sweep_speedup"], BUDGET, True)})
        del ours, ref, m
        free_memory()
    notes.append(f"Naive loops are timed on {N_SAMPLE[size]} sampled sites and extrapolated: grid time = one clean "
                 "run + sites × per-site time. Peers other than HF are timed after the first group and scaled by "
                 "HF's per-site time re-measured beside them. max_abs_diff_vs_sweep: the naive loop's KL values "
                 "against the batched sweep's on the sampled sites.")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "label", "sites", "per_site_ms", "grid_s", "sites_per_s", "sweep_speedup",
                 "max_abs_diff_vs_sweep"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
