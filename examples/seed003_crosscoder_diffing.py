"""Seed 003 — diffing a base model against its chain-of-thought child with a crosscoder, then
patching, zeroing and scaling the child's features while the models write their reasoning.

The pipeline, in the seed's order:
1. baseline accuracy of base and child on held-out arithmetic word problems (chat template, greedy,
   answers read as `hookedcot.cot.answers` reads them, Wilson 95 % intervals);
2. an activation store: the residual after block `--layer` of both models on exactly the same
   tokens (chat prompt + step-by-step reference reasoning of problems disjoint from the evaluation);
3. a crosscoder (L1 on decoder norms, the seed's setting, or `--architecture batchtopk`), with its
   loss curve and fraction of variance explained per model;
4. per-feature statistics (relative decoder norm: base-only / shared / child-only; top contexts)
   and Minder et al.'s latent scaling for the features chosen;
5. interventions, each one a row of the accuracy table: the child's chosen features patched into
   the base, every latent patched (a control: the base's activation becomes the child's up to the
   reconstruction errors), the chosen features zeroed in the child, and scaled ×1.5 and ×0.5.
   The other model runs in lockstep on the same tokens, so every edit reads the crosscoder's joint
   latent (`FeaturePatch`, `JointEdit`), and keeps the reconstruction error: only the chosen
   features change.

Features chosen (`--top-features N`, `--select`): "shift" (default) ranks latents by how far
patching them moves the base, the mean over the store of f_j · ||d_j^child − d_j^base||;
"mean-activation" is the seed's ranking; "relative-norm" takes the highest mean activation among
child-leaning latents (relative decoder norm ≥ `--min-relative-norm`), Minder et al.'s notion of
a child feature.

With no `--child`, the child is the base fine-tuned on generated step-by-step arithmetic
(`examples/_child.py`, cached under `--cache-dir`). Any real pair sharing a tokenizer works:

    python examples/seed003_crosscoder_diffing.py                      # SmolLM2-135M + its child, CPU
    python examples/seed003_crosscoder_diffing.py --device cuda --dtype bfloat16 \\
        --base Qwen/Qwen2.5-Math-1.5B --child deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\
        --layer 12 --n-problems 200 --n-store 4000 --d-latent 16384 --steps 20000 --max-new-tokens 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _child  # noqa: E402
import _common as C  # noqa: E402

from hookedcot.dictionaries import (  # noqa: E402
    FeatureEdit, FeaturePatch, JointEdit, accuracy_table, collect_activations, evaluate_accuracy, feature_stats,
    fraction_of_variance_explained, latent_scaling, train_crosscoder,
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seed003_crosscoder_diffing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", "--model", dest="model", default=C.DEFAULT_MODEL, help="the base model")
    p.add_argument("--child", default=None, help="the child model (default: the base fine-tuned here)")
    p.add_argument("--layer", type=int, default=None, help="block whose output residual is diffed (default: 40%% depth)")
    p.add_argument("--n-problems", type=int, default=48, help="held-out problems per accuracy row")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reasoning budget per problem")
    p.add_argument("--n-store", type=int, default=384, help="texts in the activation store")
    p.add_argument("--architecture", default="l1", choices=["l1", "batchtopk"])
    p.add_argument("--d-latent", type=int, default=1024)
    p.add_argument("--l1-coeff", type=float, default=2.0, help="L1 weight (architecture l1)")
    p.add_argument("--k", type=int, default=32, help="latents per token (architecture batchtopk)")
    p.add_argument("--steps", type=int, default=400, help="crosscoder training steps")
    p.add_argument("--batch-size", type=int, default=512, help="crosscoder tokens per step")
    p.add_argument("--top-features", type=int, default=8)
    p.add_argument("--select", default="shift", choices=["shift", "relative-norm", "mean-activation"],
                   help="how the child's features are chosen (module docstring)")
    p.add_argument("--min-relative-norm", type=float, default=0.6, help="for --select relative-norm")
    p.add_argument("--child-steps", type=int, default=30, help="fine-tuning steps of the made child")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--cache-dir", default="hookedcot_out/children", help="where made children are kept")
    p.add_argument("--out", default="hookedcot_out/seed003_crosscoder_diffing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    return p.parse_args(argv)


def load_child(args: argparse.Namespace, base: Any) -> Any:
    if args.child:
        from hookedcot import HookedCoT

        with C.step(f"loading the child {args.child}"):
            return HookedCoT.from_pretrained(args.child, dtype=args.dtype, device=args.device)
    with C.step("making the child (step-by-step arithmetic fine-tune, cached)"):
        return _child.make_child(base, args.cache_dir, steps=args.child_steps, seed=args.seed, progress=False)


def store_texts(model: Any, n: int, seed: int) -> list[str]:
    """Chat prompt + reference step-by-step reasoning of problems the evaluation never sees."""
    return [model.apply_chat_template([{"role": "user", "content": p.question}]) + p.reasoning
            for p in _child.training_problems(n, seed=seed + 1)]


@torch.no_grad()
def decoder_shift(coder: Any, store: Any, hook: str) -> torch.Tensor:
    """Per latent, the mean over the store's tokens of f_j · ||d_j^child − d_j^base|| (raw scale):
    how far patching latent j from child into base moves the base's activation."""
    gap = (coder.W_dec[:, 1] / coder.input_scale[1] - coder.W_dec[:, 0] / coder.input_scale[0]).norm(dim=-1)
    total, n = torch.zeros(coder.d_latent, dtype=torch.float64), 0
    for batch in store.batches(hook, 4096, shuffle=False):
        total += (coder.encode(batch.acts.to(gap.device)) * gap).sum(0).double().cpu()
        n += len(batch.tokens)
    return (total / max(n, 1)).float()


def choose_features(rule: str, stats: Any, shift: torch.Tensor, n: int, min_relative_norm: float) -> list[int]:
    live = [j for j in range(len(stats.classes)) if stats.classes[j] != "dead"]
    if rule == "shift":
        return sorted(live, key=lambda j: -float(shift[j]))[:n]
    alive = set(live)
    ranked = [j for j in stats.top(len(stats.classes), by="mean_activation") if j in alive]
    if rule == "mean-activation":
        return ranked[:n]
    return [j for j in ranked if float(stats.relative_norm[j]) >= min_relative_norm][:n]


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    base = C.load_model(args)
    child = load_child(args, base)
    layer = args.layer if args.layer is not None else round(0.4 * base.cfg.n_layers)
    hook = f"blocks.{layer}.hook_resid_post"
    problems = _child.held_out_problems(args.n_problems, seed=args.seed + 12345)
    ev = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, progress=False)
    timings: dict[str, float] = {}

    with C.step("1. baseline accuracies") as s:
        accuracy = evaluate_accuracy(base, problems, {"base": []}, **ev) + evaluate_accuracy(child, problems, {"child": []}, **ev)
    timings["baselines"] = s.seconds

    with C.step(f"2. activation store: {hook} of both models on {args.n_store} texts") as s:
        store = collect_activations({"base": base, "child": child}, store_texts(base, args.n_store, args.seed), hook,
                                    out / f"store_{layer}_{args.n_store}_{args.seed}", batch_size=8, progress=False)
    timings["store"] = s.seconds
    tag = f"{args.architecture}_{args.d_latent}_{args.l1_coeff if args.architecture == 'l1' else args.k}_{args.steps}"
    tag += f"_{args.batch_size}_{layer}_{args.n_store}_{args.seed}"  # a rerun with other settings never resumes these
    print(f"  {store}", flush=True)

    with C.step(f"3. crosscoder ({args.architecture}, {args.d_latent} latents, {args.steps} steps)") as s:
        coder, log = train_crosscoder(store, hook_name=hook, d_latent=args.d_latent, architecture=args.architecture,
                                      l1_coeff=args.l1_coeff, k=args.k, steps=args.steps, batch_size=args.batch_size,
                                      seed=args.seed, device=base.device, checkpoint_dir=out / f"crosscoder_checkpoints_{tag}",
                                      checkpoint_every=max(1, args.steps // 4), plot=out / "crosscoder_loss.png",
                                      progress=False)
        coder.save(out / "crosscoder")
        coder = coder.to(base.device)
    timings["crosscoder"] = s.seconds
    fve = fraction_of_variance_explained(coder, store, hook_name=hook)
    print(f"  fraction of variance explained: " + ", ".join(f"{m} {v:.3f}" for m, v in fve.items()), flush=True)

    with C.step("4. feature statistics and latent scaling") as s:
        stats = feature_stats(coder, store, hook, top_k=5)
        stats.save(out / "feature_stats.json")
        shift = decoder_shift(coder, store, hook)
        top = choose_features(args.select, stats, shift, args.top_features, args.min_relative_norm)
        scaling = latent_scaling(coder, store, top, hook_name=hook, base="base", child="child") if top else None
    timings["analysis"] = s.seconds
    classes = {c: stats.classes.count(c) for c in sorted(set(stats.classes))}
    print(f"  classes: {classes}; chosen features: {top}", flush=True)

    with C.step("5. interventions") as s:
        patch = {"base ← child, chosen features": FeaturePatch(child, coder, top, source="child", target="base"),
                 "base ← child, every latent (control)": FeaturePatch(child, coder, None, source="child", target="base")}
        accuracy += evaluate_accuracy(base, problems, patch if top else dict(list(patch.items())[1:]), **ev)
        if top:
            accuracy += evaluate_accuracy(child, problems, {
                f"child, {name}": JointEdit(base, coder, edit, model="child") for name, edit in (
                    ("features zeroed", FeatureEdit("zero", top)), ("features ×1.5", FeatureEdit("scale", top, value=1.5)),
                    ("features ×0.5", FeatureEdit("scale", top, value=0.5)))}, **ev)
        else:
            print(f"  no feature qualifies (--select {args.select}): only the control ran", flush=True)
    timings["interventions"] = s.seconds

    figures(out, stats, accuracy)
    runtime = time.perf_counter() - t_start
    table = accuracy_table(accuracy)
    results = {
        "seed": "003", "args": vars(args), "hook": hook, "layers": base.cfg.n_layers,
        "child": getattr(child, "child_info", {"from": args.child}),
        "store": {"tokens": store.n_tokens, "shards": len(store.shards), "texts": args.n_store},
        "crosscoder": {"architecture": args.architecture, "d_latent": args.d_latent, "steps": args.steps,
                       "final_loss": log.loss[-1], "final_l0": log.sparsity[-1], "fve": fve},
        "classes": classes, "features": top, "select": args.select, "shift": [float(shift[j]) for j in top],
        "shift_total": float(shift.sum()),
        "feature_table": [stats.to_rows()[j] for j in top],
        "latent_scaling": None if scaling is None else {
            "nu_error": scaling.nu_error.tolist(), "nu_reconstruction": scaling.nu_reconstruction.tolist(),
            "flags": scaling.flags()},
        "accuracy": [r.to_dict() for r in accuracy], "timings_s": timings, "runtime_seconds": runtime,
    }
    contexts = [line for j in top[:3] for line in stats.describe(j, base).splitlines()[:4]]
    summary = [
        "# seed003_crosscoder_diffing", "",
        f"- base: `{args.model}` ({base.cfg.n_layers} layers, d_model {base.cfg.d_model}, {base.dtype}, {base.device})",
        f"- child: `{args.child}`" if args.child else
        f"- child: the base fine-tuned for {args.child_steps} steps on step-by-step arithmetic ({child.child_info['folder']}, "
        f"{'from the cache' if child.child_info['from_cache'] else 'made in this run'})",
        f"- problems: {len(problems)} held out (seed {args.seed}), greedy, {args.max_new_tokens} new tokens at most",
        f"- store: `{hook}`, {store.n_tokens} tokens of both models from {args.n_store} texts",
        f"- crosscoder: {args.architecture}, {args.d_latent} latents, {args.steps} steps × {args.batch_size} tokens; "
        f"fraction of variance explained " + ", ".join(f"{m} {v:.3f}" for m, v in fve.items())
        + f"; L0 {log.sparsity[-1]:.1f}", "",
        "## Accuracy", "", table, "",
        "## Features", "",
        f"Classes by relative decoder norm: {classes}.",
        f"Chosen (--select {args.select}): {top or 'none'}; their decoder shift (mean f_j · ||d_j^child − d_j^base||): "
        + ", ".join(f"{float(shift[j]):.3g}" for j in top) + f" (all latents: {float(shift.sum()):.3g}).",
        *([f"Latent scaling flags: " + ", ".join(f"{j}: {flag}" for j, flag in zip(top, scaling.flags()))] if scaling else []),
        "", "Top contexts of the first chosen features:", "", "```", *contexts, "```", "",
        f"Figures: crosscoder_loss.png, relative_norms.png, accuracy.png. Runtime {runtime:.1f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).",
    ]
    C.write_outputs(out, results, summary)
    print(table)
    print(f"total runtime {runtime:.1f} s", flush=True)
    return results


def figures(out: Path, stats: Any, accuracy: list) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    live = [float(r) for r, c in zip(stats.relative_norm.tolist(), stats.classes) if c != "dead"]
    ax.hist(live, bins=40, range=(0, 1), color="tab:blue")
    ax.set_xlabel(f"relative decoder norm ({stats.models[1]} / sum)")
    ax.set_ylabel("live latents")
    ax.set_title(f"{stats.models[0]}-only ← shared → {stats.models[1]}-only")
    fig.tight_layout()
    fig.savefig(out / "relative_norms.png", dpi=120)

    fig = Figure(figsize=(7, 0.5 + 0.5 * len(accuracy)))
    ax = fig.add_subplot()
    ys = list(range(len(accuracy)))[::-1]
    acc = [r.accuracy for r in accuracy]
    err = [[a - r.low for a, r in zip(acc, accuracy)], [r.high - a for a, r in zip(acc, accuracy)]]
    ax.barh(ys, acc, xerr=err, color="tab:green", capsize=3)
    ax.set_yticks(ys, [r.name for r in accuracy], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (Wilson 95 % interval)")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
