"""The seeds' typical sweep: every layer × the last SPAN positions (the reasoning) of a prompt whose
changed number sits in the question, before the span. Batched `patch_layer_position` against the
loop a user would write: one clean `run_with_cache`, one corrupted forward for the baseline, then one
forward per site with a hand-written patching hook, unembedding only the last position
(`last_logits_only=True`). The loop is timed on a sample of sites and extrapolated:
prep + sites × per-site time. The loop runs once per round, interleaved with the sweeps.

Variants, each labelled in the output:
- `inside`: the corruption inside the span (3 positions after its start), as the first version of
  this benchmark had it. The sweep skips the span positions before the corruption (exact no-ops),
  the naive loop does not.
- `full logits`: the naive loop unembedding every position (what a user slicing `logits[:, -1]`
  after a plain forward pays).
- `old method`: the first version's arithmetic: `inside` placement, full logits, and the sample's
  one clean run divided among its sites and extrapolated with them (480 sites from 8: the clean run
  counted 60 times). That is how the earlier 19.4 × was computed. Not a fair comparison.

    .venv/bin/python -m benchmarks.sweep_span                      # SmolLM2, 128 tokens, last 16, 1 thread
    .venv/bin/python -m benchmarks.sweep_span --rounds 3 --n-pos 64 --span 8 --model FOLDER
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks.common import hookedcot_allocator, interleaved, stats

NAIVE_CASES = ("last", "full")  # the naive loop unembeds the last position only, or every position


def naive_loop(model: Any, clean: torch.Tensor, corrupted: torch.Tensor, sites: list[tuple[str, int]],
               full_logits: bool = False) -> dict:
    """KL(patched || corrupted) at the last position for each (hook name, position), written the
    way a user would, with no hookedcot patching helper. -> values and seconds: the clean run,
    the baseline (corrupted) run, and a site."""
    t0 = time.perf_counter()
    _, cache = model.run_with_cache(clean, names_filter=sorted({name for name, _ in sites}))
    t_clean = time.perf_counter()
    base = model(corrupted, last_logits_only=True)[0, -1].log_softmax(-1)
    t1 = time.perf_counter()
    values = []
    for name, pos in sites:
        def patch(x, hook, name=name, pos=pos):
            x[:, pos] = cache[name][:, pos]
            return x

        logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)], last_logits_only=not full_logits)
        logp = logits[0, -1].log_softmax(-1)
        values.append(float((logp.exp() * (logp - base)).sum()))
    return {"values": values, "clean_s": t_clean - t0, "baseline_s": t1 - t_clean,
            "per_site_s": (time.perf_counter() - t1) / len(sites)}


def make_pair(vocab: int, n_pos: int, changed: int) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(3, min(vocab, 20000) - 1, (1, n_pos), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[0, changed] = (clean[0, changed] + 1) % (min(vocab, 20000) - 1)
    return clean, corrupted


def measure(model: Any, n_pos: int = 128, span: int = 16, rounds: int = 5, n_sample: int = 8) -> dict:
    from hookedcot.interp.sweeps import patch_layer_position

    vocab, n_layers = model.cfg.d_vocab, model.cfg.n_layers
    placements = {"before": n_pos // 4, "inside": n_pos - span + min(3, span - 1)}  # the changed token
    pairs = {case: make_pair(vocab, n_pos, at) for case, at in placements.items()}
    span_pos = list(range(n_pos - span, n_pos))
    sites = [(f"blocks.{layer}.hook_resid_pre", p) for layer in range(n_layers) for p in span_pos]
    step = max(1, len(sites) // n_sample)
    sample = sites[::step][:n_sample]
    sweeps: dict[str, torch.Tensor] = {}
    naive: dict[str, list[dict]] = {case: [] for case in NAIVE_CASES}

    def sweep(case: str):
        sweeps[case] = patch_layer_position(model, *pairs[case], positions=f"last {span}", progress=False).values

    fns = {f"sweep {case}": (lambda case=case: sweep(case)) for case in placements}
    fns |= {f"naive {case}": (lambda case=case: naive[case].append(
        naive_loop(model, *pairs["before"], sample, full_logits=case == "full"))) for case in NAIVE_CASES}
    times = interleaved(fns, reps=rounds, warmup=1)
    for case in naive:
        del naive[case][0]  # the warm-up round's

    n_sites = len(sites)
    flat = {case: values.flatten() for case, values in sweeps.items()}
    check = {case: max(abs(a - float(flat[case][sites.index(s)]))
                       for a, s in zip(naive_loop(model, *pairs[case], sample)["values"], sample)) for case in placements}

    def grid_s(record: dict, old_method: bool) -> float:
        if old_method:  # the first version: the sample's one clean run spread over its sites, no baseline run
            return n_sites * (record["clean_s"] / len(sample) + record["per_site_s"])
        return record["clean_s"] + record["baseline_s"] + n_sites * record["per_site_s"]

    def ratios(naive_case: str, sweep_case: str, old_method: bool = False) -> dict:
        sweep_s = times[f"sweep {sweep_case}"]
        return stats([grid_s(record, old_method) / s for record, s in zip(naive[naive_case], sweep_s)])

    def seconds(key: str) -> dict:
        return {case: stats([record[key] for record in naive[case]]) for case in NAIVE_CASES}

    return {
        "sites": n_sites, "layers": n_layers, "span": span, "n_pos": n_pos, "sampled_sites": len(sample),
        "threads": torch.get_num_threads(), "changed_position": placements,
        "sweep_s": {case: stats(times[f"sweep {case}"]) for case in placements},
        "naive_clean_s": seconds("clean_s"), "naive_baseline_s": seconds("baseline_s"),
        "naive_per_site_s": seconds("per_site_s"),
        "max_abs_diff_naive_vs_sweep": check,
        "speedup": {
            "headline: changed token before the span, naive loop with last-position logits": ratios("last", "before"),
            "variant inside: changed token inside the span, naive loop with last-position logits": ratios("last", "inside"),
            "variant full logits: changed token before the span, naive loop with full logits": ratios("full", "before"),
            "variant old method: inside, full logits, the clean run counted once per sampled site (not fair)":
                ratios("full", "inside", old_method=True),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep_span", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model's name or a checkpoint folder")
    p.add_argument("--n-pos", type=int, default=128)
    p.add_argument("--span", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sample", type=int, default=8, help="sites the naive loop runs each round")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from hookedcot import HookedCoT

    torch.set_num_threads(args.threads)
    hookedcot_allocator()
    model = HookedCoT.from_pretrained(args.model)
    with torch.inference_mode():
        out = measure(model, args.n_pos, args.span, args.rounds, args.sample)
    for label, s in out["speedup"].items():
        print(f"{label}: {s['median']:.1f} × (rounds {s['min']:.1f}–{s['max']:.1f}, n {s['n']})")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
