"""Question 2: greedy decoding speed, batch 1, with and without a hook attached, against
transformers' `generate` on the same prompt and the same number of new tokens (eos disabled:
`stop_at_eos=False` for us and TransformerLens, `min_new_tokens` for transformers / nnsight).

The hook is a no-op on the middle layer's resid_post, active for the whole generation (every
step). Tokens/s counts new tokens over the whole call (prefill included, for every tool alike).
Every tool runs in a process of its own (`benchmarks.processes`).
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    log, short,
    Settings, budget_verdict, is_smollm2, checkpoint_folder, checkpoint_shape, interleaved, paired_ratio,
    random_tokens, result, stats,
)
from benchmarks.peers import LABELS, Unavailable
from benchmarks.processes import close, start_reference, start_tool

NAME = "generate"
PROMPT_LEN = {"full": 32, "quick": 32, "tiny": 4}
NEW_TOKENS = {"full": 32, "quick": 16, "tiny": 3}
NEW_TOKENS_BIG = {"full": 8, "quick": 8, "tiny": 3}
GPU_NEW_TOKENS = 32  # every model, full and quick
REPS = {"full": 3, "quick": 2, "tiny": 1}
BUDGET = 1.5
SKIP_BY_DEFAULT = {"llama3.2-1b-shape"}  # minutes per call on a 2-core CPU; name it in --models to run it


def generated_tokens(tool, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Run in the tool's process: its greedy tokens, for the same-tokens-as-HF check."""
    return tool.generate(prompt, n_new, None)()


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    for model in settings.models_for(set() if settings.gpu else SKIP_BY_DEFAULT):
        folder = checkpoint_folder(model, settings.cache_dir)
        n_layers, vocab = checkpoint_shape(folder)
        ours = start_tool("ours", folder, settings)
        mid = n_layers // 2
        n_new = (NEW_TOKENS if is_smollm2(model) else NEW_TOKENS_BIG)[settings.size]
        if settings.gpu and settings.size != "tiny":
            n_new = GPU_NEW_TOKENS
        prompt = random_tokens(1, PROMPT_LEN[settings.size], vocab, seed=2).to(settings.device)
        ref = start_reference(folder, settings, model, skipped)
        ours_tokens = ours.run(generated_tokens, prompt, n_new)
        same = None if ref is None else bool(torch.equal(ours_tokens, ref.run(generated_tokens, prompt, n_new)))
        groups = [("ours", {"ours": ours, **({"hf_sdpa": ref} if ref else {})})]
        groups += [(p, None) for p in settings.peers_for(model) if p not in ("hf_sdpa", "hf_eager")]
        for group_name, tools in groups:
            if tools is None:
                try:
                    tools = {group_name: start_tool(group_name, folder, settings), **({"hf_sdpa": ref} if ref else {})}
                except Unavailable as why:
                    skipped.append({"model": short(model), "tool": group_name, "reason": str(why)})
                    continue
            log(f"generate {short(model)} {group_name} group")
            fns = {}
            for name, tool in tools.items():
                for case, hook_layer in (("no hook", None), ("hook", mid)):
                    fn = tool.generate(prompt, n_new, hook_layer)
                    if isinstance(fn, str):
                        skipped.append({"model": short(model), "tool": name, "case": case, "reason": fn})
                    else:
                        fns[f"{name}:{case}"] = fn
            failures: dict[str, str] = {}
            times = interleaved(fns, reps=REPS[settings.size], warmup=1, device=settings.device, failures=failures)
            for key, reason in failures.items():
                skipped.append({"model": short(model), "tool": key.split(":")[0], "case": key.split(":")[1],
                                "reason": reason})
            hf = times.get("hf_sdpa:no hook")
            for key, samples in times.items():
                tool, case = key.split(":")
                if group_name != "ours" and tool == "hf_sdpa":
                    continue
                hf_same_case = times.get(f"hf_sdpa:{case}")
                rows.append({
                    "model": short(model), "tool": tool, "label": LABELS[tool], "case": case, "prompt": prompt.shape[1],
                    "new_tokens": n_new, "time_s": stats(samples), "tokens_per_s": n_new / stats(samples)["median"],
                    # speed ratios: the reference's time over this tool's, per round
                    "x_hf_generate": paired_ratio(hf, samples) if hf else None,
                    "x_hf_same_case": paired_ratio(hf_same_case, samples) if hf_same_case else None,
                    "same_tokens_as_hf": same if tool == "ours" else None,
                })
            if group_name != "ours":
                tools.pop(group_name).close()
        for row in rows:
            if row["model"] == short(model) and row["tool"] == "ours" and row["case"] == "hook":
                budgets.append({"budget": "greedy decode with a hook ≥ 1.5 × HF generate tokens/s", "model": short(model),
                                "shape": f"1×{prompt.shape[1]} + {n_new}", "ratio": row["x_hf_generate"],
                                "limit": BUDGET, "verdict": budget_verdict(row["x_hf_generate"], BUDGET, True)})
        close(ours, ref)
    notes.append("× HF generate: HF's (no hook) time over this tool's time, median over interleaved rounds "
                 "(> 1 is faster). × HF same case: against HF with the same hook (a forward hook on that layer). "
                 "same_tokens_as_hf: our greedy tokens equal transformers' for this prompt.")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "label", "case", "new_tokens", "tokens_per_s", "x_hf_generate", "x_hf_same_case",
                 "same_tokens_as_hf"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
