"""Question 6: what does the attention anatomy of a long reasoning trace cost?

`hookedcot.cot.step_attention` on a trace of a prompt and ~100 steps of 40 tokens (4,096 tokens
in the full pass): its time as a ratio to one plain forward of the same trace, with logits (what
a user runs anyway to read the trace: the honest baseline) and without (`return_type=None`), and
its peak memory beyond the loaded model. Then `suppress_steps` on a few steps spread over the
trace: the time per suppressed step (a forward over the positions after the step).

Times: hookedcot in a process of its own (`benchmarks.processes`), the cases interleaved round by
round after a warm-up on a short trace; a ratio is the median of the per-round ratios. Memory:
each case once in a FRESH process (`peak_child`): load, one short forward, give freed memory back
to the system (malloc_trim), reset the high-water mark (/proc/self/clear_refs), run the case,
read VmHWM; the figure is VmHWM minus the RSS just before the case (on a GPU:
torch.cuda.max_memory_allocated minus what was allocated before).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics

import torch

from benchmarks.common import (
    Settings, budget_verdict, checkpoint_folder, checkpoint_shape, interleaved, log, paired_ratio, random_tokens,
    result, short, stats,
)
from benchmarks.load_child import status_bytes
from benchmarks.processes import close, start_tool

NAME = "attention_anatomy"
# (prompt tokens, steps, tokens per step): 96 + 100 × 40 = 4,096 tokens in the full pass
SHAPES = {"full": (96, 100, 40), "quick": (64, 24, 40), "tiny": (4, 5, 6)}
WARMUP_SHAPE = {"full": (16, 6, 40), "quick": (16, 6, 40), "tiny": (4, 5, 6)}
REPS = {"full": 3, "quick": 2, "tiny": 1}
SUPPRESSED = {"full": 4, "quick": 3, "tiny": 2}  # steps suppressed per call, evenly spread
TIME_BUDGET, MEMORY_BUDGET_GIB = 3.0, 1.0
SKIP_BY_DEFAULT = {"qwen2-0.5b-shape", "llama3.2-1b-shape"}  # SmolLM2 is the budget's model
CASES = ("plain forward, logits", "plain forward, no logits", "step_attention", "suppress_steps")


def trace_of(shape: tuple[int, int, int], vocab: int, device: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    prompt, n_steps, step_len = shape
    tokens = random_tokens(1, prompt + n_steps * step_len, vocab, seed=6).to(device)
    return tokens, [(prompt + step_len * i, prompt + step_len * (i + 1)) for i in range(n_steps)]


def spread(n_steps: int, k: int) -> list[int]:
    """k step indices evenly spread from the first to the last."""
    k = min(k, n_steps)
    return sorted({round(i * (n_steps - 1) / max(1, k - 1)) for i in range(k)})


def run_case(tool, case: str, tokens: torch.Tensor, spans: list, steps: list[int]) -> None:
    """One call of a case, in hookedcot's process (`ToolProcess.run`); returns nothing to ship."""
    model = getattr(tool, "model", tool)
    if case == "plain forward, logits":
        model(tokens)
    elif case == "plain forward, no logits":
        model(tokens, return_type=None)
    elif case == "step_attention":
        from hookedcot.cot.attention import step_attention

        step_attention(model, tokens=tokens, spans=spans)
    else:
        from hookedcot.cot.suppression import suppress_steps

        suppress_steps(model, tokens=tokens, spans=spans, steps=steps)


def peak_child(folder: str, dtype_name: str, device: str, threads: int, case: str, tokens, spans, steps) -> dict:
    """Runs in a fresh spawned process: the memory one case adds to a loaded model."""
    import ctypes
    import gc

    from hookedcot import HookedCoT

    if threads:
        torch.set_num_threads(threads)
    model = HookedCoT.from_pretrained(folder, dtype=getattr(torch, dtype_name), device=device)
    tokens = tokens.to(device)
    with torch.inference_mode():
        model(tokens[:, :8])  # lazy one-time initialisation is not the case's cost
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
        gpu = device.startswith("cuda")
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS (Linux ≥ 4.0)
            reset = True
        except OSError:
            reset = False
        run_case(model, case, tokens, spans, steps)
        peak = torch.cuda.max_memory_allocated() if gpu else status_bytes("VmHWM")
    return {"before": before, "peak": peak, "extra": peak - before, "hwm_reset": reset or gpu}


def fresh_peak(settings: Settings, folder, case: str, tokens, spans, steps) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_child, (str(folder), settings.dtype_name, settings.device, settings.threads, case,
                                       tokens.cpu(), spans, steps))


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    for model in settings.models_for(set() if settings.gpu else SKIP_BY_DEFAULT):
        folder = checkpoint_folder(model, settings.cache_dir)
        vocab = checkpoint_shape(folder)[1]
        tokens, spans = trace_of(SHAPES[settings.size], vocab, settings.device)
        steps = spread(len(spans), SUPPRESSED[settings.size])
        pos = tokens.shape[1]
        ours = start_tool("ours", folder, settings)
        warm_tokens, warm_spans = trace_of(WARMUP_SHAPE[settings.size], vocab, settings.device)
        for case in CASES:  # warm-up on a short trace: the long one is too slow to run once more for nothing
            ours.run(run_case, case, warm_tokens, warm_spans, [0, len(warm_spans) - 1])
        log(f"{NAME} {short(model)} {pos} tokens, {len(spans)} steps: timing")
        fns = {case: (lambda case=case: ours.run(run_case, case, tokens, spans, steps)) for case in CASES}
        times = interleaved(fns, reps=REPS[settings.size], warmup=0, device=settings.device)
        close(ours)
        memory = {}
        for case in CASES[:3]:
            log(f"{NAME} {short(model)}: peak memory of {case} in a fresh process")
            memory[case] = fresh_peak(settings, folder, case, tokens, spans, steps)
        plain, plain_none = times[CASES[0]], times[CASES[1]]
        for case in CASES:
            samples = times[case]
            row = {
                "model": short(model), "tool": "ours", "case": case, "pos": pos, "steps": len(spans),
                "time_s": stats(samples), "median_s": statistics.median(samples), "x_plain_logits": paired_ratio(samples, plain),
                "x_plain_no_logits": paired_ratio(samples, plain_none),
                "peak_extra_MiB": memory[case]["extra"] / 2**20 if case in memory else None,
                "suppressed": None, "per_step_s": None, "per_step_x_plain_logits": None,
            }
            if case == "suppress_steps":
                # the call = one unsuppressed forward (no logits) + one forward after each suppressed step
                per_step = [(t - p) / len(steps) for t, p in zip(samples, plain_none)]
                row.update(suppressed=len(steps), per_step_s=statistics.median(per_step),
                           per_step_x_plain_logits=statistics.median(s / p for s, p in zip(per_step, plain)))
            rows.append(row)
        anatomy = next(r for r in rows if r["model"] == short(model) and r["case"] == "step_attention")
        shape = f"1×{pos}, {len(spans)} steps"
        budgets.append({"budget": "step_attention ≤ 3 × a plain forward with logits", "model": short(model),
                        "shape": shape, "ratio": anatomy["x_plain_logits"], "limit": TIME_BUDGET,
                        "verdict": budget_verdict(anatomy["x_plain_logits"], TIME_BUDGET, False)})
        gib = anatomy["peak_extra_MiB"] / 1024
        budgets.append({"budget": "step_attention: peak memory beyond the loaded model ≤ 1 GiB", "model": short(model),
                        "shape": shape, "ratio": gib, "limit": MEMORY_BUDGET_GIB,
                        "verdict": budget_verdict(gib, MEMORY_BUDGET_GIB, False)})
        if not all(m["hwm_reset"] for m in memory.values()):
            notes.append("the peak RSS could not be reset before the case (/proc/self/clear_refs): the figures "
                         "include the load's own peak")
    notes.append("x_plain_logits: the case's time over a plain forward with logits of the same trace, median over "
                 "interleaved rounds (x_plain_no_logits: over one with return_type=None). peak_extra_MiB: the case "
                 "alone in a fresh process, high-water RSS minus RSS before it (model loaded). suppress_steps: one "
                 "call suppressing `suppressed` steps spread over the trace; per_step_s = (call - plain forward "
                 "without logits of the same round) / suppressed steps.")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "case", "pos", "steps", "median_s", "x_plain_logits", "x_plain_no_logits", "peak_extra_MiB",
                 "suppressed", "per_step_s", "per_step_x_plain_logits"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
