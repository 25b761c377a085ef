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

With `--latent-steps K` the reasoning is the seed's: K continuous thoughts instead of tokens. Each
question ("Q: ...\\nA:") is followed by K latent steps (`hookedcot.cot.latent.generate_latent`:
the last layer's read-out at the last position, through `--feedback`, is the next input
embedding), then the answer cue; the K latent positions are patched layer by layer, the runs
given to `prepare_runs` as input embeddings. `--feedback argmax_embedding` (the default) feeds the
embedding of the greedy token, so on a model not trained for continuous thought the latent steps
are its greedy reasoning, kept as vectors; `identity` feeds the read-out itself; a `.safetensors`
path loads a projection (a CODI head: use it with `--read-from ln_final`, the vector CODI feeds).
The latent inputs of the corrupted run stay fixed while patching, as the token span's do.

    python examples/seed001_layerwise_patching.py                    # SmolLM2-135M, 4 pairs, CPU
    python examples/seed001_layerwise_patching.py --model Qwen/Qwen2.5-1.5B-Instruct --n-pairs 20 \\
        --device cuda --span "cot-last 5"
    python examples/seed001_layerwise_patching.py --latent-steps 6   # 6 continuous thoughts
    python examples/seed001_layerwise_patching.py --model CODI_LLAMA_FOLDER --latent-steps 6 \\
        --feedback prj.safetensors --read-from ln_final
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hookedcot import get_act_name  # noqa: E402
from hookedcot.cot.latent import LatentTrace, generate_latent  # noqa: E402
from hookedcot.interp import Result, Site, kl_divergence, l2_distance, prepare_runs, run_sites, top1_changed  # noqa: E402

METRICS = ("kl", "l2", "top1_changed")
LATENT_ARGS = ("latent_steps", "feedback", "read_from")  # left out of the results when not used


def parse(argv: list[str] | None):
    p = C.base_parser("seed001_layerwise_patching", __doc__, n_pairs=4)
    p.add_argument("--span", default="cot", help=C.SPAN_HELP)
    p.add_argument("--hook", default="resid_pre", help="the activation patched at each layer")
    p.add_argument("--layer-step", type=int, default=1, help="patch every N-th layer")
    p.add_argument("--latent-steps", type=int, default=None, metavar="K",
                   help="patch K latent (continuous-thought) positions after the question instead of --span")
    p.add_argument("--feedback", default=None, help="with --latent-steps: argmax_embedding (default), identity, "
                   "or a .safetensors projection (linear, or a CODI head)")
    p.add_argument("--read-from", default=None, choices=("resid_post", "ln_final"),
                   help="with --latent-steps: the vector fed back, before (resid_post, default) or after the final "
                   "norm (ln_final: transformers' hidden_states[-1], what CODI feeds)")
    args = p.parse_args(argv)
    if args.latent_steps is None and (args.feedback or args.read_from):
        p.error("--feedback and --read-from go with --latent-steps")
    if args.latent_steps is not None:
        if args.latent_steps < 1:
            p.error("--latent-steps must be at least 1")
        args.feedback = args.feedback or "argmax_embedding"
        args.read_from = args.read_from or "resid_post"
    return args


@dataclass
class LatentPair:
    """A pair's two latent runs: question, K latent steps, the answer cue (and the answer tokens
    both share), each ending at the answer position as the token pair's sequences do."""

    id: str
    clean: LatentTrace
    corrupted: LatentTrace
    first_diff: int  # the first position whose input embeddings differ
    clean_id: int
    corrupted_id: int
    answers: dict

    @property
    def n_pos(self) -> int:
        return self.clean.n_pos

    def describe(self) -> dict:
        latent = self.clean.latent_positions
        return {"id": self.id, "n_positions": self.n_pos, "first_diff": self.first_diff,
                "latent": [latent[0], latent[-1] + 1], **self.answers,
                "clean_text": self.clean.text if self.clean.tokenizer is not None else None}


def latent_pair(model, inputs: C.PairInputs, args) -> LatentPair:
    """Question, `args.latent_steps` latent steps, then what follows the reasoning in the token pair."""
    clean, corrupted = [generate_latent(model, tokens[0, : inputs.cot_start], args.latent_steps, args.feedback,
                                        read_from=args.read_from, end=tokens[0, inputs.cot_end :])
                        for tokens in (inputs.clean_tokens, inputs.corrupted_tokens)]
    differ = (clean.embeds[0] != corrupted.embeds[0]).any(-1).nonzero()
    info = inputs.describe()
    return LatentPair(inputs.id, clean, corrupted, int(differ[0, 0]) if len(differ) else clean.n_pos,
                      inputs.clean_id, inputs.corrupted_id,
                      {k: info[k] for k in ("clean_answer", "corrupted_answer", "clean_id", "corrupted_id")})


def run_inputs(pair, which: str = "clean") -> dict:
    """`model(**...)`'s input for one run of a pair: its tokens, or its latent run's embeddings."""
    if isinstance(pair, LatentPair):
        return {"inputs_embeds": getattr(pair, which).embeds}
    return {"input": getattr(pair, f"{which}_tokens")}


def pair_runs(model, pair, names: list[str], source: str = "clean"):
    """`prepare_runs` on a pair, patching from its `source` run ("clean", or "corrupted" itself)."""
    if isinstance(pair, LatentPair):
        return prepare_runs(model, None, None, names, clean_embeds=getattr(pair, source).embeds,
                            corrupted_embeds=pair.corrupted.embeds)
    return prepare_runs(model, getattr(pair, f"{source}_tokens"), pair.corrupted_tokens, names)


def patch_positions(pair, spec: str) -> list[int]:
    """The positions patched: the span `spec` of a token pair, the latent positions of a latent one."""
    return pair.clean.latent_positions if isinstance(pair, LatentPair) else C.span(pair, spec)


def answer_metrics(runs) -> dict:
    """The seed's three metrics at the answer position, against the corrupted baseline."""
    base = runs.logits("corrupted", [-1])  # [1, 1, vocab]
    return {
        "kl": lambda logits: kl_divergence(logits, base.expand_as(logits))[:, 0],
        "l2": lambda logits: l2_distance(logits, base.expand_as(logits))[:, 0],
        "top1_changed": lambda logits: top1_changed(logits, base.expand_as(logits))[:, 0],
    }


def patch_layers_all_metrics(model, inputs, layers: list[int], positions: list[int], hook: str,
                             source: str = "clean", metrics=METRICS) -> dict[str, torch.Tensor]:
    """{metric: [layer]} — the clean and corrupted runs are made once and shared by the metrics."""
    names = [get_act_name(hook, layer) for layer in layers]
    runs = pair_runs(model, inputs, names, source)
    sites = [Site(name, tuple(positions)) for name in names]
    fns = {k: fn for k, fn in answer_metrics(runs).items() if k in metrics}
    return run_sites(runs, sites, fns, progress=False)  # every metric from the same patched forwards


@torch.no_grad()
def baseline(model, inputs) -> dict:
    clean = model(**run_inputs(inputs, "clean"))[:, -1:]
    corrupted = model(**run_inputs(inputs, "corrupted"))[:, -1:]
    p_clean, p_corr = clean.float().softmax(-1)[0, 0], corrupted.float().softmax(-1)[0, 0]
    return {"kl_clean_vs_corrupted": float(kl_divergence(clean, corrupted)[0, 0]),
            "clean_run_p_clean_answer": float(p_clean[inputs.clean_id]),
            "corrupted_run_p_corrupted_answer": float(p_corr[inputs.corrupted_id])}


def sanity_checks(model, inputs, hook: str, positions: list[int]) -> dict:
    """Identities on the first pair, at three layers."""
    n = model.cfg.n_layers
    layers = sorted({0, n // 2, n - 1})
    self_patch = patch_layers_all_metrics(model, inputs, layers, positions, hook, source="corrupted",
                                          metrics=("kl", "top1_changed"))
    whole = patch_layers_all_metrics(model, inputs, layers, C.span(inputs, "diff"), hook, metrics=("kl",))
    return {"layers": layers, "self_patch_max_kl": float(self_patch["kl"].abs().max()),
            "self_patch_any_top1_change": bool(self_patch["top1_changed"].any()),
            "from_first_diff_kl": whole["kl"].tolist()}


def plot_by_layer(out: Path, layers: list[int], stats: dict, span_name: str = "reasoning span") -> Path:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    titles = {"kl": "KL(patched || corrupted)", "l2": "L2 distance of logits", "top1_changed": "top-1 change rate"}
    for ax, k in zip(axes, METRICS):
        ax.errorbar(layers, stats[k]["mean"], yerr=stats[k]["std"], marker="o", capsize=3)
        ax.set_xlabel("patched layer")
        ax.set_title(titles[k])
        ax.grid(alpha=0.3)
    fig.suptitle(f"layer-wise patching of the {span_name} (mean ± std over pairs)")
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
    if args.latent_steps is not None:
        with C.step(f"{args.latent_steps} latent steps per run ({args.feedback} feedback, read from {args.read_from})"):
            pairs = [latent_pair(model, inputs, args) for inputs in pairs]
    layers = C.layer_list(model, args.layer_step)
    per_pair = {k: [] for k in METRICS}
    records = []
    t_patch = time.perf_counter()
    for i, inputs in enumerate(pairs):
        positions = patch_positions(inputs, args.span)
        with C.step(f"pair {i + 1}/{len(pairs)} {inputs.id}: {len(layers)} layers × span of {len(positions)} positions"):
            values = patch_layers_all_metrics(model, inputs, layers, positions, args.hook)
        for k in METRICS:
            per_pair[k].append(values[k])
        records.append({**inputs.describe(), "span": [positions[0], positions[-1] + 1], **baseline(model, inputs),
                        **{k: values[k] for k in METRICS}})
        print(f"  KL by layer: {' '.join(f'{v:.3g}' for v in values['kl'].tolist())}", flush=True)
    t_patch = time.perf_counter() - t_patch
    with C.step("sanity checks on pair 1"):
        checks = sanity_checks(model, pairs[0], args.hook, patch_positions(pairs[0], args.span))
    all_kl = torch.stack(per_pair["kl"])
    checks["min_kl"] = float(all_kl.min())
    checks["kl_nonnegative"] = checks["min_kl"] >= -1e-6
    checks["from_first_diff_equals_clean"] = max(abs(v - records[0]["kl_clean_vs_corrupted"])
                                                 for v in checks["from_first_diff_kl"]) < 1e-3
    stats = {k: {"mean": torch.stack(v).mean(0), "std": torch.stack(v).std(0, unbiased=False)} for k, v in per_pair.items()}

    out.mkdir(parents=True, exist_ok=True)
    plot_by_layer(out, layers, stats, "reasoning span" if args.latent_steps is None else "latent positions")
    heat = Result(all_kl, ("pair", "layer"), {"pair": [p.id for p in pairs], "layer": [str(x) for x in layers]},
                  name="kl_pairs_x_layers")
    heat.plot(out / "kl_pairs_x_layers.png", title="KL(patched || corrupted) per pair and patched layer",
              cmap="Reds", center=None, value_label="KL")
    mean_kl = stats["kl"]["mean"]
    ranked = sorted(range(len(layers)), key=lambda j: -float(mean_kl[j]))
    half = next((layers[j] for j in range(len(layers)) if all(mean_kl[j:] < 0.5 * mean_kl.max())), None)
    runtime = time.perf_counter() - t_start
    run_args = {k: v for k, v in vars(args).items() if k not in LATENT_ARGS or args.latent_steps is not None}
    results = {"seed": "001", "args": run_args, "layers": layers, "hook": args.hook, "pairs": records,
               "aggregate": stats, "top5_layers_by_kl": [layers[j] for j in ranked[:5]], "sanity_checks": checks,
               "patched_forwards": len(pairs) * len(layers) * len(METRICS), "patching_seconds": t_patch,
               "runtime_seconds": runtime}
    summary = C.run_header(args, model, "seed001_layerwise_patching") + [
        (f"Patched `{args.hook}` over the reasoning span (`--span {args.span}`)" if args.latent_steps is None else
         f"Patched `{args.hook}` over the {args.latent_steps} latent positions after the question (`--latent-steps "
         f"{args.latent_steps}`: {args.feedback} feedback of the vector read from {args.read_from}; the corrupted "
         "run's latent inputs held fixed)")
        + f" at each of {len(layers)} layers "
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
