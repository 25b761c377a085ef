"""Question: sampled rollouts from one shared prefix (design §5: ≥ 3 × transformers' new tokens/s).

N sampled continuations of a fixed number of new tokens from one random-token prefix:
`hookedcot.cot.sample_rollouts` (the prefix run once, its KV cache copied to the N rows) against
transformers' `generate(num_return_sequences=N, do_sample=True)` from the same prefix, same
temperature and top-p (top-k off for both), eos disabled for both so both make N × new tokens
(`stop_at_eos=False` for us, `min_new_tokens` for transformers). Tokens/s counts the new tokens
over the whole call, prefill included. Each tool runs in a process of its own and times itself
there (`benchmarks.processes`); rounds are interleaved, rotating who goes first, the warm-up round
dropped; the ratio is the median of the per-round ratios. On a GPU N is 64 and the 1.5B shape
(`qwen2-1.5b-shape`, registered here for GPU runs) joins the models given.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import (
    RANDOM_SPECS, Settings, budget_verdict, checkpoint_folder, checkpoint_shape, interleaved, is_smollm2, log,
    random_tokens, result, short, stats, sync,
)
from benchmarks.processes import close, start_reference, start_tool

NAME = "rollouts"
PREFIX_LEN = {"full": 256, "quick": 256, "tiny": 8}
NEW_TOKENS = {"full": 64, "quick": 64, "tiny": 3}
N_ROLLOUTS = {"full": 16, "quick": 16, "tiny": 3}
GPU_N_ROLLOUTS = 64
ROUNDS = {"full": 5, "quick": 3, "tiny": 2}
BIG_ROUNDS = {"full": 3, "quick": 2, "tiny": 2}  # models other than SmolLM2 on a CPU: minutes a round
TEMPERATURE, TOP_P = 0.6, 0.95  # Thought Anchors' sampling
BUDGET = 3.0
SKIP_BY_DEFAULT = {"llama3.2-1b-shape"}  # minutes per round on a 2-core CPU; name it in --models to run it
QUICK_MODELS_ONLY_SMOLLM2 = True  # --quick: SmolLM2 alone (transformers' N-fold prefill of a 0.5B model is ~1 min)
GPU_MODEL = "qwen2-1.5b-shape"
GPU_SPEC = ("Qwen2Config", dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=131072, use_sliding_window=False,
    sliding_window=131072, max_window_layers=28, bos_token_id=151643, eos_token_id=151643,
))


def ours_in_process(tool, prefix: torch.Tensor, n: int, n_new: int, seed: int, device: str) -> dict:
    """Run in hookedcot's process: N rollouts of the prefix, timed there."""
    from hookedcot.cot.rollouts import sample_rollouts

    sync(device)
    t0 = time.perf_counter()
    out = sample_rollouts(tool.model, prefix[0], n, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=n_new,
                          seed=seed, stop_at_eos=False, progress=False)
    sync(device)
    return {"s": time.perf_counter() - t0, "tokens": sum(len(r.tokens) for r in out)}


def hf_in_process(tool, prefix: torch.Tensor, n: int, n_new: int, seed: int, device: str) -> dict:
    """Run in transformers' process: generate(num_return_sequences=N, do_sample=True), timed there."""
    m = tool.model
    pad = m.generation_config.pad_token_id
    torch.manual_seed(seed)
    sync(device)
    t0 = time.perf_counter()
    out = m.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=True, temperature=TEMPERATURE,
                     top_p=TOP_P, top_k=0, num_return_sequences=n, max_new_tokens=n_new, min_new_tokens=n_new,
                     pad_token_id=pad if pad is not None else 0, use_cache=True)
    sync(device)
    return {"s": time.perf_counter() - t0, "tokens": (out.shape[1] - prefix.shape[1]) * out.shape[0]}


def timed_rounds(jobs: dict, rounds: int) -> dict[str, list[dict]]:
    """Each job once a round, rounds interleaved (rotating who goes first); the warm-up dropped."""
    out: dict[str, list[dict]] = {key: [] for key in jobs}
    interleaved({k: (lambda k=k: out[k].append(jobs[k]())) for k in jobs}, reps=rounds, warmup=1)
    return {k: v[1:] for k, v in out.items()}


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    size, device = settings.size, settings.device
    models = settings.models_for(set() if settings.gpu else SKIP_BY_DEFAULT)
    if size == "quick" and QUICK_MODELS_ONLY_SMOLLM2 and not settings.models_explicit:
        models = [m for m in models if is_smollm2(m)]
    if settings.gpu and size != "tiny" and GPU_MODEL not in models:
        RANDOM_SPECS.setdefault(GPU_MODEL, GPU_SPEC)
        models.append(GPU_MODEL)
    n = GPU_N_ROLLOUTS if settings.gpu and size != "tiny" else N_ROLLOUTS[size]
    n_new, n_prefix = NEW_TOKENS[size], PREFIX_LEN[size]
    for model in models:
        folder = checkpoint_folder(model, settings.cache_dir)
        _, vocab = checkpoint_shape(folder)
        prefix = random_tokens(1, n_prefix, vocab, seed=5)
        rounds = (ROUNDS if is_smollm2(model) or settings.gpu else BIG_ROUNDS)[size]
        log(f"rollouts {short(model)}: {n} × {n_new} new tokens from a {n_prefix}-token prefix, {rounds} rounds")
        ours = start_tool("ours", folder, settings)
        ref = start_reference(folder, settings, model, skipped)
        tools = {"ours": (ours, ours_in_process), **({"hf_sdpa": (ref, hf_in_process)} if ref else {})}
        jobs = {name: (lambda t=t, fn=fn: t.run(fn, prefix, n, n_new, 0, device)) for name, (t, fn) in tools.items()}
        runs = timed_rounds(jobs, rounds)
        hf_s = [r["s"] for r in runs.get("hf_sdpa", [])]
        for name, records in runs.items():
            secs = [r["s"] for r in records]
            ratio = stats([h / s for h, s in zip(hf_s, secs)]) if hf_s else None
            rows.append({
                "model": short(model), "tool": name, "rollouts": n, "prefix": n_prefix, "new_tokens": n_new,
                "tokens": records[-1]["tokens"], "time_s": stats(secs),
                "tokens_per_s": records[-1]["tokens"] / statistics.median(secs),
                "x_hf_generate": ratio["median"] if ratio else None,
                "x_range": f"{ratio['min']:.3g}–{ratio['max']:.3g}" if ratio else None,
            })
        ours_row = next(r for r in rows if r["model"] == short(model) and r["tool"] == "ours")
        budgets.append({"budget": "sampled rollouts ≥ 3 × HF generate(num_return_sequences) new tokens/s",
                        "model": short(model), "shape": f"{n} × {n_new} from {n_prefix}",
                        "ratio": ours_row["x_hf_generate"], "limit": BUDGET,
                        "verdict": budget_verdict(ours_row["x_hf_generate"], BUDGET, True)})
        close(ours, ref)
    notes.append(f"Temperature {TEMPERATURE}, top-p {TOP_P}, top-k off, eos off for both; new tokens/s over the whole "
                 "call (prefill included). × HF generate: median over interleaved rounds of HF's time / ours "
                 "(x_range: min–max). transformers expands the prompt to the N rows before its prefill; hookedcot "
                 "runs the prefix once and copies its KV cache.")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "tool", "rollouts", "prefix", "new_tokens", "tokens_per_s", "x_hf_generate", "x_range"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
