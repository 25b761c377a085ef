"""Question 1: what does a forward pass cost, with no hooks, a no-op hook on every layer's
residual, a cache of every resid_post, and a cache of everything?

Groups of tools are timed together, interleaved: first hookedcot with transformers' sdpa model
(the reference), then each peer with the same reference, one peer in memory at a time. Every tool
runs in a process of its own (`benchmarks.processes`), so no peer runs under hookedcot's allocator
option. Each case is reported as a ratio to the same tool's plain forward (× own plain) and to the
reference's plain forward of the same round (× HF sdpa).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import (
    log, short,
    Settings, budget_verdict, is_smollm2, checkpoint_folder, checkpoint_shape, interleaved, paired_ratio,
    random_tokens, result, stats,
)
from benchmarks.peers import LABELS, Unavailable
from benchmarks.processes import close, start_reference, start_tool

NAME = "forward"
# (batch, pos) per size; the big random-shape models run the design's anchor shape only on CPU.
# 8 × 512 (about 35 s per call on one core) is left out of the default CPU pass.
SHAPES = {"full": [(1, 128), (8, 128), (1, 512)], "quick": [(1, 128)], "tiny": [(1, 8)]}
GPU_SHAPES = [(1, 128), (8, 128), (1, 512), (8, 512)]  # every model, in the full pass
BIG_MODEL_SHAPES = {"full": [(1, 128)], "quick": [(1, 128)], "tiny": [(1, 8)]}
# Interleaved rounds: as many as fit in TARGET_S per group and shape, within [MIN, MAX].
TARGET_S = {"full": 40.0, "quick": 12.0, "tiny": 0.0}
MIN_REPS, MAX_REPS = {"full": 5, "quick": 3, "tiny": 2}, {"full": 15, "quick": 7, "tiny": 2}
BUDGETS = {  # case -> (what, ratio key, budget)
    "plain": ("forward, no hooks ≤ 1.02 × HF sdpa", "x_hf_plain", 1.02),
    "noop_hook_every_layer": ("a no-op hook on every layer ≤ 1.03 × no hooks", "x_own_plain", 1.03),
    "cache_resid_post": ("run_with_cache of all resid_post ≤ 1.05 × plain forward", "x_own_plain", 1.05),
    "cache_all": ("full cache ≤ 1.15 × plain forward", "x_own_plain", 1.15),
}


def shapes_for(model: str, settings: Settings) -> list[tuple[int, int]]:
    if settings.gpu and settings.size == "full":
        return GPU_SHAPES
    table = SHAPES if is_smollm2(model) or settings.size == "tiny" else BIG_MODEL_SHAPES
    return table[settings.size]


def reps_for(round_s: float, size: str) -> int:
    want = int(TARGET_S[size] / max(round_s, 1e-6))
    return max(MIN_REPS[size], min(MAX_REPS[size], want))


def time_group(tools: dict, tokens: torch.Tensor, settings: Settings, reference_plain_only: bool = False
               ) -> tuple[dict, dict[str, str]]:
    """Every (tool, case) callable of the group, interleaved. -> (times by "tool:case", skipped reasons)."""
    fns, skipped = {}, {}
    for name, tool in tools.items():
        for case, fn in tool.forward_cases(tokens).items():
            if reference_plain_only and name == "hf_sdpa" and case != "plain":
                continue
            if isinstance(fn, str):
                skipped[f"{name}:{case}"] = fn
            else:
                fns[f"{name}:{case}"] = fn
    t0 = time.perf_counter()
    interleaved(fns, reps=0, warmup=1, device=settings.device, failures=skipped)  # warm-up; sizes the run
    for key in skipped:
        fns.pop(key, None)
    reps = reps_for(time.perf_counter() - t0, settings.size)
    return interleaved(fns, reps=reps, warmup=0, device=settings.device), skipped


@torch.inference_mode()
def max_logit_diff(tool, ref, tokens: torch.Tensor) -> float | None:
    if ref is None:
        return None
    a, b = tool.last_logits(tokens[:1]).float(), ref.last_logits(tokens[:1]).float()
    return float((a - b).abs().max())


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    for model in settings.models_for():
        folder = checkpoint_folder(model, settings.cache_dir)
        vocab = checkpoint_shape(folder)[1]
        ours = start_tool("ours", folder, settings)
        ref = start_reference(folder, settings, model, skipped)
        peers = [p for p in settings.peers_for(model) if p != "hf_sdpa"]
        groups: list[tuple[str, dict]] = [("ours", {"ours": ours, **({"hf_sdpa": ref} if ref else {})})]
        groups += [(p, None) for p in peers]
        for group_name, tools in groups:
            if tools is None:
                try:
                    peer = start_tool(group_name, folder, settings)
                except Unavailable as why:
                    skipped.append({"model": short(model), "tool": group_name, "reason": str(why)})
                    continue
                tools = {group_name: peer, **({"hf_sdpa": ref} if ref else {})}
            subjects = set(tools) if group_name == "ours" else {group_name}
            probe = random_tokens(1, 16, vocab, seed=1).to(settings.device)
            diffs = {name: max_logit_diff(t, ref, probe) for name, t in tools.items()}
            for i, (batch, pos) in enumerate(shapes_for(model, settings)):
                if i > 0 and group_name != "ours":
                    break  # peers: the first shape only (time); ours and the reference: every shape
                log(f"forward {short(model)} {group_name} group, {batch}×{pos}")
                tokens = random_tokens(batch, pos, vocab).to(settings.device)
                times, why_not = time_group(tools, tokens, settings, reference_plain_only=i > 0)
                for key, reason in why_not.items():
                    if key.split(":")[0] in subjects:
                        skipped.append({"model": short(model), "tool": key.split(":")[0], "case": key.split(":")[1], "reason": reason})
                for key, samples in times.items():
                    tool, case = key.split(":")
                    if group_name != "ours" and tool == "hf_sdpa":
                        continue  # the reference's rows come from the first group
                    own = times.get(f"{tool}:plain")
                    hf = times.get("hf_sdpa:plain")
                    rows.append({
                        "model": short(model), "batch": batch, "pos": pos, "tool": tool, "label": LABELS[tool],
                        "case": case, "time_s": stats(samples),
                        "median_ms": 1e3 * stats(samples)["median"],
                        "tokens_per_s": batch * pos / stats(samples)["median"],
                        "x_own_plain": paired_ratio(samples, own) if own and case != "plain" else None,
                        "x_hf_plain": paired_ratio(samples, hf) if hf else None,
                        "max_abs_logit_diff_vs_hf": diffs.get(tool) if case == "plain" and tool != "hf_sdpa" else None,
                    })
            if group_name != "ours":
                tools.pop(group_name).close()
        close(ours, ref)
    for row in rows:
        if row["tool"] == "ours" and row["case"] in BUDGETS:
            what, key, limit = BUDGETS[row["case"]]
            budgets.append({"budget": what, "model": row["model"], "shape": f"{row['batch']}×{row['pos']}",
                            "ratio": row[key], "limit": limit, "verdict": budget_verdict(row[key], limit, False)})
    notes.append("× own plain: median over interleaved rounds of (case time / the same tool's plain forward); "
                 "× HF sdpa: the same against transformers' sdpa plain forward of that round. "
                 "HF 'cache_resid_post' is output_hidden_states=True; HF's no-op hooks are forward hooks on each "
                 "decoder layer. Peers run in their own group with the reference, one at a time (memory); every tool "
                 "in a process of its own, hookedcot's with its allocator option (retain_freed_memory), the others "
                 "as they run alone.")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "batch", "pos", "label", "case", "median_ms", "x_own_plain", "x_hf_plain",
                 "max_abs_logit_diff_vs_hf"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
