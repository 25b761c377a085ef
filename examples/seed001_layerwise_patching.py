"""Seed 001 — layer-wise activation patching of the chain-of-thought span.

For each clean/corrupted GSM8K-style pair (the corrupted question moves one number, so the
answer changes; both carry their own correct reference reasoning, teacher forced), the clean
residual stream at every position of the reasoning span is written into the corrupted run at one
layer at a time, and the output at the answer position (after " The answer is") is compared
with the corrupted run's: KL(patched || corrupted) (primary), the L2 distance of the logits and
whether the top-1 prediction changed. Mean ± std over pairs per layer; a pairs × layers heatmap.

Sanity checks (printed and in summary.md): patching the corrupted run into itself gives KL 0;
every KL is ≥ 0; patching the whole residual from the first differing token on gives the clean
run at every layer (KL = KL(clean || corrupted)).

    python examples/seed001_layerwise_patching.py                    # SmolLM2-135M, 4 pairs, CPU
    python examples/seed001_layerwise_patching.py --model Qwen/Qwen2.5-1.5B-Instruct --n-pairs 20 \\
        --device cuda --span "cot-last 5"
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hookedcot import get_act_name  # noqa: E402
from hookedcot.interp import Result, Site, kl_divergence, l2_distance, prepare_runs, run_sites, top1_changed  # noqa: E402

METRICS = ("kl", "l2", "top1_changed")


def parse(argv: list[str] | None):
    p = C.base_parser("seed001_layerwise_patching", __doc__, n_pairs=4)
    p.add_argument("--span", default="cot", help=C.SPAN_HELP)
    p.add_argument("--hook", default="resid_pre", help="the activation patched at each layer")
    p.add_argument("--layer-step", type=int, default=1, help="patch every N-th layer")
    return p.parse_args(argv)


def answer_metrics(runs) -> dict:
    """The seed's three metrics at the answer position, against the corrupted baseline."""
    base = runs.logits("corrupted", [-1])  # [1, 1, vocab]
    return {
        "kl": lambda logits: kl_divergence(logits, base.expand_as(logits))[:, 0],
        "l2": lambda logits: l2_distance(logits, base.expand_as(logits))[:, 0],
        "top1_changed": lambda logits: top1_changed(logits, base.expand_as(logits))[:, 0],
    }


def patch_layers_all_metrics(model, inputs: C.PairInputs, layers: list[int], positions: list[int], hook: str,
                             source=None, metrics=METRICS) -> dict[str, torch.Tensor]:
    """{metric: [layer]} — the clean and corrupted runs are made once and shared by the metrics."""
    names = [get_act_name(hook, layer) for layer in layers]
    runs = prepare_runs(model, inputs.clean_tokens if source is None else source, inputs.corrupted_tokens, names)
    sites = [Site(name, tuple(positions)) for name in names]
    fns = {k: fn for k, fn in answer_metrics(runs).items() if k in metrics}
    return run_sites(runs, sites, fns, progress=False)  # every metric from the same patched forwards


@torch.no_grad()
def baseline(model, inputs: C.PairInputs) -> dict:
    clean = model(inputs.clean_tokens)[:, -1:]
    corrupted = model(inputs.corrupted_tokens)[:, -1:]
    p_clean, p_corr = clean.float().softmax(-1)[0, 0], corrupted.float().softmax(-1)[0, 0]
    return {"kl_clean_vs_corrupted": float(kl_divergence(clean, corrupted)[0, 0]),
            "clean_run_p_clean_answer": float(p_clean[inputs.clean_id]),
            "corrupted_run_p_corrupted_answer": float(p_corr[inputs.corrupted_id])}


def sanity_checks(model, inputs: C.PairInputs, hook: str, positions: list[int]) -> dict:
    """Identities on the first pair, at three layers."""
    n = model.cfg.n_layers
    layers = sorted({0, n // 2, n - 1})
    self_patch = patch_layers_all_metrics(model, inputs, layers, positions, hook, source=inputs.corrupted_tokens,
                                          metrics=("kl", "top1_changed"))
    whole = patch_layers_all_metrics(model, inputs, layers, C.span(inputs, "diff"), hook, metrics=("kl",))
    return {"layers": layers, "self_patch_max_kl": float(self_patch["kl"].abs().max()),
            "self_patch_any_top1_change": bool(self_patch["top1_changed"].any()),
            "from_first_diff_kl": whole["kl"].tolist()}


def plot_by_layer(out: Path, layers: list[int], stats: dict) -> Path:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    titles = {"kl": "KL(patched || corrupted)", "l2": "L2 distance of logits", "top1_changed": "top-1 change rate"}
    for ax, k in zip(axes, METRICS):
        ax.errorbar(layers, stats[k]["mean"], yerr=stats[k]["std"], marker="o", capsize=3)
        ax.set_xlabel("patched layer")
        ax.set_title(titles[k])
        ax.grid(alpha=0.3)
    fig.suptitle("layer-wise patching of the reasoning span (mean ± std over pairs)")
    fig.tight_layout()
    fig.savefig(out / "metrics_by_layer.png", dpi=120)
    plt.close(fig)
    return out / "metrics_by_layer.png"


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse(argv)
    out = Path(args.out)
    model = C.load_model(args)
    pairs = C.pick_pairs(model, args)
    layers = C.layer_list(model, args.layer_step)
    per_pair = {k: [] for k in METRICS}
    records = []
    t_patch = time.perf_counter()
    for i, inputs in enumerate(pairs):
        positions = C.span(inputs, args.span)
        with C.step(f"pair {i + 1}/{len(pairs)} {inputs.id}: {len(layers)} layers × span of {len(positions)} positions"):
            values = patch_layers_all_metrics(model, inputs, layers, positions, args.hook)
        for k in METRICS:
            per_pair[k].append(values[k])
        records.append({**inputs.describe(), "span": [positions[0], positions[-1] + 1], **baseline(model, inputs),
                        **{k: values[k] for k in METRICS}})
        print(f"  KL by layer: {' '.join(f'{v:.3g}' for v in values['kl'].tolist())}", flush=True)
    t_patch = time.perf_counter() - t_patch
    with C.step("sanity checks on pair 1"):
        checks = sanity_checks(model, pairs[0], args.hook, C.span(pairs[0], args.span))
    all_kl = torch.stack(per_pair["kl"])
    checks["min_kl"] = float(all_kl.min())
    checks["kl_nonnegative"] = checks["min_kl"] >= -1e-6
    checks["from_first_diff_equals_clean"] = max(abs(v - records[0]["kl_clean_vs_corrupted"])
                                                 for v in checks["from_first_diff_kl"]) < 1e-3
    stats = {k: {"mean": torch.stack(v).mean(0), "std": torch.stack(v).std(0, unbiased=False)} for k, v in per_pair.items()}

    out.mkdir(parents=True, exist_ok=True)
    plot_by_layer(out, layers, stats)
    heat = Result(all_kl, ("pair", "layer"), {"pair": [p.id for p in pairs], "layer": [str(x) for x in layers]},
                  name="kl_pairs_x_layers")
    heat.plot(out / "kl_pairs_x_layers.png", title="KL(patched || corrupted) per pair and patched layer",
              cmap="Reds", center=None, value_label="KL")
    mean_kl = stats["kl"]["mean"]
    ranked = sorted(range(len(layers)), key=lambda j: -float(mean_kl[j]))
    half = next((layers[j] for j in range(len(layers)) if all(mean_kl[j:] < 0.5 * mean_kl.max())), None)
    runtime = time.perf_counter() - t_start
    results = {"seed": "001", "args": vars(args), "layers": layers, "hook": args.hook, "pairs": records,
               "aggregate": stats, "top5_layers_by_kl": [layers[j] for j in ranked[:5]], "sanity_checks": checks,
               "patched_forwards": len(pairs) * len(layers) * len(METRICS), "patching_seconds": t_patch,
               "runtime_seconds": runtime}
    summary = C.run_header(args, model, "seed001_layerwise_patching") + [
        f"Patched `{args.hook}` over the reasoning span (`--span {args.span}`) at each of {len(layers)} layers "
        f"into the corrupted run; metrics at the answer position (after \"{C.ANSWER_CUE.strip()}\").", "",
        "| layer | mean KL | std KL | mean L2 | top-1 change rate |", "|---|---|---|---|---|",
        *[f"| {layers[j]} | {float(mean_kl[j]):.4g} | {float(stats['kl']['std'][j]):.3g} | "
          f"{float(stats['l2']['mean'][j]):.3g} | {float(stats['top1_changed']['mean'][j]):.2f} |" for j in range(len(layers))],
        "", f"Baseline KL(clean || corrupted) at the answer position: "
        f"{sum(r['kl_clean_vs_corrupted'] for r in records) / len(records):.4g} (mean over pairs).",
        f"Top-5 layers by mean KL: {results['top5_layers_by_kl']}. "
        + (f"Mean KL stays below half its maximum from layer {half} on: by then the answer positions have already "
           "read what they need from the reasoning span, so patching it no longer changes the answer."
           if half is not None else "Mean KL never falls below half its maximum."), "",
        "Sanity checks (pair 1, layers " + ", ".join(map(str, checks["layers"])) + "):",
        f"- corrupted patched into itself: max KL {checks['self_patch_max_kl']:.2e}, top-1 changed: "
        f"{checks['self_patch_any_top1_change']}",
        f"- every KL ≥ 0: {checks['kl_nonnegative']} (min {checks['min_kl']:.2e})",
        f"- whole residual from the first differing token patched = the clean run: "
        f"{checks['from_first_diff_equals_clean']} (KL {', '.join(f'{v:.4g}' for v in checks['from_first_diff_kl'])} "
        f"vs {records[0]['kl_clean_vs_corrupted']:.4g})", "",
        f"Figures: metrics_by_layer.png, kl_pairs_x_layers.png. {results['patched_forwards']} patched rows (pair × layer × metric) "
        f"in {t_patch:.1f} s; total runtime {runtime:.1f} s.",
    ]
    C.write_outputs(out, results, summary)
    print(f"top-5 layers by mean KL: {results['top5_layers_by_kl']}; sanity: self-patch KL "
          f"{checks['self_patch_max_kl']:.1e}, min KL {checks['min_kl']:.1e}, "
          f"whole-residual = clean: {checks['from_first_diff_equals_clean']}")
    print(f"total runtime {runtime:.1f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
