"""Issue 15: greedy decoding with a steering vector added at one layer, hookedcot's decode paths
against transformers' `generate` with the same add done by a forward hook, same weights, same
prompt, eos off.

Cases: hookedcot `eager` (the hook loop), `static` (static KV cache, the `AddVector`
intervention inside the step) and `compiled` (that step compiled by inductor, its products as
reductions; the compile is timed apart and excluded from the rounds), and HF sdpa with
`register_forward_hook` on the same decoder layer adding the same vector to its output. Without
hooks: hookedcot `compiled` against HF `generate` (dynamic cache) and HF with its static cache
and `torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`, as HF documents it.
Batch 1 at the budget's length (128 new tokens), then batch 8 and 64 (fewer tokens).

Compile times: the first compile runs in a throwaway process on an empty inductor cache (cold);
the measuring process then compiles the same step again from inductor's on-disk cache (warm, as
a later process of a user would). Each other shape (no hooks, batch 8, 64) is a cold compile.

Also measured, in the rounds: the memory read bandwidth (`torch.sum` over a 512 MiB float32
tensor in the parent, same thread count), from which the step time's fraction of the bandwidth
limit (bytes of every matrix a step reads ÷ bandwidth) follows; and a per-step profile of each
hookedcot path (torch.profiler over the decode steps only: matrix products, other aten ops, and
the rest — Python and compiled kernels the profiler does not see as aten ops).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from benchmarks.common import (
    Settings, budget_verdict, checkpoint_folder, checkpoint_shape, interleaved, is_smollm2, log, paired_ratio,
    random_tokens, result, short, stats,
)
from benchmarks.processes import close, start_reference, start_tool

NAME = "steered_generate"
PROMPT_LEN = {"full": 32, "quick": 32, "tiny": 4}
NEW_TOKENS = {"full": 128, "quick": 32, "tiny": 3}
BATCH_NEW_TOKENS = {"full": 32, "quick": 16, "tiny": 3}
BATCHES = {"full": (8, 64), "quick": (8,), "tiny": (2,)}
REPS = {"full": 3, "quick": 2, "tiny": 1}
COMPILE = {"full": True, "quick": True, "tiny": False}  # a compile takes minutes on a loaded 2-core machine
SAME_TOKENS = {"full": True, "quick": True, "tiny": True}  # one more generation per case and tool
ALPHA = 4.0
BUDGET = 2.0
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def _vector(d_model: int) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(7)) / d_model**0.5


def ours_generate(tool, prompt: torch.Tensor, n_new: int, layer: int, decode: str) -> torch.Tensor:
    """Run in hookedcot's process. One `AddVector` per (layer, decode) is kept, as a user steering
    many prompts with one vector would."""
    from hookedcot.interp.steering import add_vector

    key = ("steer", layer, decode)
    if key not in tool.__dict__:
        tool.__dict__[key] = add_vector(f"blocks.{layer}.hook_resid_post", _vector(tool.model.cfg.d_model), ALPHA)
    return tool.model.generate(prompt, n_new, stop_at_eos=False, fwd_hooks=[tool.__dict__[key]], decode=decode)


def hf_generate(tool, prompt: torch.Tensor, n_new: int, layer: int) -> torch.Tensor:
    """Run in transformers' process: the decoder layer's output plus α·v, by a forward hook."""
    m = tool.model
    delta = (ALPHA * _vector(m.config.hidden_size)).to(m.device, m.dtype)

    def steer(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta

    pad = m.generation_config.pad_token_id
    handle = tool.layers[layer].register_forward_hook(steer)
    try:
        return m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=pad if pad is not None else 0, use_cache=True)
    finally:
        handle.remove()


def ours_plain(tool, prompt: torch.Tensor, n_new: int, decode: str) -> torch.Tensor:
    """Run in hookedcot's process: no hooks."""
    return tool.model.generate(prompt, n_new, stop_at_eos=False, decode=decode)


def hf_plain(tool, prompt: torch.Tensor, n_new: int, static_compiled: bool) -> torch.Tensor:
    """Run in transformers' process, no hooks: `generate` as is, or with HF's static cache and the
    forward compiled as HF's docs show (`mode="reduce-overhead", fullgraph=True`), kept compiled."""
    m = tool.model
    pad = m.generation_config.pad_token_id
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
              pad_token_id=pad if pad is not None else 0, use_cache=True)
    if not static_compiled:
        return m.generate(prompt, **kw)
    if "compiled_forward" not in tool.__dict__:
        tool.__dict__["compiled_forward"] = torch.compile(m.forward, mode="reduce-overhead", fullgraph=True)
    m.forward = tool.__dict__["compiled_forward"]  # for this call only: the other cases run the model as loaded
    try:
        return m.generate(prompt, cache_implementation="static", **kw)
    finally:
        del m.forward


def timed_first(tool, fn, *args) -> float:
    """Run in a tool's process: seconds of `fn(tool, *args)`, a first call (a compile and one generation)."""
    start = time.perf_counter()
    fn(tool, *args)
    return time.perf_counter() - start


def compile_seconds(tool, prompt: torch.Tensor, n_new: int, layer: int | None) -> float:
    """Run in hookedcot's process: the compile time of the first compiled generation of this shape
    (fast_decode's record; 0.0 when this process had it compiled already). `layer` None: no hooks."""
    from hookedcot.fast_decode import COMPILE_SECONDS

    before = set(COMPILE_SECONDS)
    if layer is None:
        ours_plain(tool, prompt, n_new, "compiled")
    else:
        ours_generate(tool, prompt, n_new, layer, "compiled")
    new = [COMPILE_SECONDS[k] for k in COMPILE_SECONDS if k not in before]
    return new[0] if new else 0.0


def weight_bytes(tool) -> int:
    """Bytes of every matrix a decode step reads: the Linear weights (the unembedding included,
    tied or not); an embedding lookup reads one row, counted as nothing."""
    seen, total = set(), 0
    for mod in tool.model.modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def profile_steps(tool, prompt: torch.Tensor, n_new: int, layer: int, decode: str) -> dict[str, float]:
    """Per decode step (ms): wall, matrix products, other aten ops, the rest (Python, compiled kernels)."""
    from torch.profiler import ProfilerActivity, profile

    state: dict = {}

    def on_token(step: int, tokens: torch.Tensor) -> None:
        if step == 0:  # the prompt has run: profile the decode steps only
            state["prof"] = profile(activities=[ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        if step == n_new - 1:
            state["wall"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)

    key = ("steer", layer, decode)
    if key not in tool.__dict__:
        ours_generate(tool, prompt, 2, layer, decode)
    tool.model.generate(prompt, n_new, stop_at_eos=False, fwd_hooks=[tool.__dict__[key]], decode=decode,
                        on_token=on_token)
    events = [e for e in state["prof"].key_averages() if e.key.startswith("aten::")]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e3
    other = sum(e.self_cpu_time_total for e in events if e.key not in MATMUL_OPS) / 1e3
    steps = n_new - 1
    wall = state["wall"] * 1e3
    return {"wall_ms": wall / steps, "matmul_ms": matmul / steps, "other_ops_ms": other / steps,
            "rest_ms": (wall - matmul - other) / steps}


def _bandwidth_probe(threads: int, device: str):
    """A read of 512 MiB on the device the models run on (`interleaved` syncs around each call)."""
    if threads:
        torch.set_num_threads(threads)
    big = torch.ones(1 << 27, device=device)  # 512 MiB of float32
    return big, lambda: big.sum()


def _ours_with_cold_compile(folder, settings, prompt, n_new, layer, rows, model, compile_on: bool):
    """hookedcot's measuring process, after a throwaway one compiled the steered step on an empty
    inductor cache; both compile times go into `rows` (cold, then warm from the on-disk cache)."""
    if not compile_on:
        return start_tool("ours", folder, settings)
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hookedcot-inductor-")
    try:
        first = start_tool("ours", folder, settings)
        cold = first.run(compile_seconds, prompt, n_new, layer)
        close(first)
        ours = start_tool("ours", folder, settings)  # same on-disk cache, a new process
        warm = ours.run(compile_seconds, prompt, n_new, layer)
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
    for case, sec in (("compile cold", cold), ("compile warm", warm)):
        rows.append({"model": short(model), "tool": "ours", "case": case, "batch": 1, "compile_s": sec})
    return ours


def run(settings: Settings) -> dict:
    rows, skipped, notes, budgets = [], [], [], []
    big, read = _bandwidth_probe(settings.threads, settings.device)
    models = settings.models_for({"llama3.2-1b-shape"})
    for model in models:
        folder = checkpoint_folder(model, settings.cache_dir)
        n_layers, vocab = checkpoint_shape(folder)
        layer = n_layers // 2
        n_new = NEW_TOKENS[settings.size]
        prompt = random_tokens(1, PROMPT_LEN[settings.size], vocab, seed=2)
        compile_on = COMPILE[settings.size]
        log(f"steered generate {short(model)}: compile (cold, then warm)")
        ours = _ours_with_cold_compile(folder, settings, prompt, n_new, layer, rows, model, compile_on)
        ref = start_reference(folder, settings, model, skipped)
        decodes = ["eager", "static"] + (["compiled"] if compile_on else [])
        if not compile_on:
            skipped.append({"model": short(model), "tool": "ours", "case": "compiled",
                            "reason": f"not compiled at this size ({settings.size}): a compile takes a minute on 2 cores"})
        plain = {}
        if compile_on:
            c = ours.run(compile_seconds, prompt, n_new, None)
            rows.append({"model": short(model), "tool": "ours", "case": "compile (no hooks)", "batch": 1, "compile_s": c})
            plain["ours:compiled (no hooks)"] = lambda: ours.run(ours_plain, prompt, n_new, "compiled")
            if ref:
                c = ref.run(timed_first, hf_plain, prompt, n_new, True)
                rows.append({"model": short(model), "tool": "hf", "case": "compile static (no hooks)", "batch": 1,
                             "compile_s": c, "note": "first generate: compile + one generation"})
                plain["hf:static compiled (no hooks)"] = lambda: ref.run(hf_plain, prompt, n_new, True)
        if ref:
            plain["hf:generate (no hooks)"] = lambda: ref.run(hf_plain, prompt, n_new, False)
        same = {d: bool(torch.equal(ours.run(ours_generate, prompt, n_new, layer, d),
                                    ref.run(hf_generate, prompt, n_new, layer)))
                if ref and SAME_TOKENS[settings.size] else None for d in decodes}
        fns = {f"ours:{d}": (lambda d=d: ours.run(ours_generate, prompt, n_new, layer, d)) for d in decodes}
        if ref:
            fns["hf:hook"] = lambda: ref.run(hf_generate, prompt, n_new, layer)
        fns.update(plain)
        fns["bandwidth"] = read
        log(f"steered generate {short(model)}: batch 1, {n_new} tokens")
        times = interleaved(fns, reps=REPS[settings.size], warmup=1, device=settings.device)
        bw = [big.numel() * 4 / t for t in times.pop("bandwidth")]
        w_bytes = ours.run(weight_bytes)
        hf = times.get("hf:hook")
        hf_static = times.get("hf:static compiled (no hooks)")
        hf_plain_t = times.get("hf:generate (no hooks)")
        for key, samples in times.items():
            tool, case = key.split(":")
            hooked = "no hooks" not in case
            row = {"model": short(model), "tool": tool, "case": case, "batch": 1, "new_tokens": n_new,
                   "time_s": stats(samples), "tokens_per_s": n_new / stats(samples)["median"],
                   "step_ms": 1e3 * stats(samples)["median"] / n_new,
                   "x_hf_hook": paired_ratio(hf, samples) if hf and hooked else None,
                   "x_hf_plain": paired_ratio(hf_plain_t, samples) if hf_plain_t and not hooked else None,
                   "x_hf_static_compiled": paired_ratio(hf_static, samples) if hf_static and not hooked else None,
                   # the bandwidth limit of a step over the step (whole call / new tokens), per round
                   "bandwidth_fraction": stats([w_bytes / b / (t / n_new) for b, t in zip(bw, samples)])["median"],
                   "same_tokens_as_hf": same.get(case) if tool == "ours" and hooked else None}
            rows.append(row)
            if tool == "ours" and case in ("static", "compiled"):
                budgets.append({"budget": f"steered greedy decode ({case}) ≥ {BUDGET} × HF generate + forward hook",
                                "model": short(model), "shape": f"1×{PROMPT_LEN[settings.size]}+{n_new}",
                                "ratio": row["x_hf_hook"], "limit": BUDGET,
                                "verdict": budget_verdict(row["x_hf_hook"], BUDGET, True)})
        notes.append(f"{short(model)}: memory read bandwidth {stats(bw)['median'] / 1e9:.1f} GB/s (median; "
                     f"{min(bw) / 1e9:.1f}–{max(bw) / 1e9:.1f}), {w_bytes / 1e6:.0f} MB of matrices a step → "
                     f"limit {1e3 * w_bytes / stats(bw)['median']:.1f} ms a step")
        for d in decodes:
            prof = ours.run(profile_steps, prompt, min(n_new, 33), layer, d)
            rows.append({"model": short(model), "tool": "ours", "case": f"profile {d}", "batch": 1, **prof})
        for batch in BATCHES[settings.size] if is_smollm2(model) or settings.size == "tiny" else ():
            n_b = BATCH_NEW_TOKENS[settings.size]
            prompts = random_tokens(batch, PROMPT_LEN[settings.size], vocab, seed=3)
            if compile_on:
                c = ours.run(compile_seconds, prompts, n_b, layer)
                rows.append({"model": short(model), "tool": "ours", "case": "compile", "batch": batch, "compile_s": c})
            fns = {f"ours:{d}": (lambda d=d: ours.run(ours_generate, prompts, n_b, layer, d)) for d in decodes}
            if ref:
                fns["hf:hook"] = lambda: ref.run(hf_generate, prompts, n_b, layer)
            log(f"steered generate {short(model)}: batch {batch}, {n_b} tokens")
            times = interleaved(fns, reps=max(1, REPS[settings.size] - 1), warmup=1, device=settings.device)
            hf = times.get("hf:hook")
            for key, samples in times.items():
                tool, case = key.split(":")
                rows.append({"model": short(model), "tool": tool, "case": case, "batch": batch, "new_tokens": n_b,
                             "time_s": stats(samples), "tokens_per_s": batch * n_b / stats(samples)["median"],
                             "x_hf_hook": paired_ratio(hf, samples) if hf else None})
        close(ours, ref)
    notes.append("tokens/s counts new tokens (× batch) over the whole call, prompt included; step_ms = call time ÷ "
                 "new tokens; every compile is timed once before the rounds and excluded from them.")
    notes.append(f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.")
    return result(NAME, rows, skipped, notes, budgets)


TABLE_COLUMNS = ["model", "tool", "case", "batch", "new_tokens", "tokens_per_s", "step_ms", "x_hf_hook",
                 "x_hf_plain", "x_hf_static_compiled", "bandwidth_fraction", "same_tokens_as_hf", "compile_s", "wall_ms", "matmul_ms", "other_ops_ms",
                 "rest_ms"]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    main(["--only", NAME, *sys.argv[1:]])
