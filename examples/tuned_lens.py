"""Train a tuned lens on the model's own text and compare it with the logit lens, layer by layer.

The model samples a continuation for each prompt (chat template, temperature 0.8, seeded); the
last `--held-out` texts are kept for evaluation, the rest train one affine translator per layer
(`hookedcot.dictionaries.train_tuned_lens`). Reported: the mean KL(final ‖ lens) per layer on the
held-out tokens for both lenses (`kl_per_layer.png`, the table in `summary.md`), and the two
lenses over one arithmetic prompt, as heatmaps of P(answer) per layer and position
(`logit/`, `tuned/`). The lens is saved in tuned-lens' layout (`lens/`).

    python examples/tuned_lens.py                           # SmolLM2-135M, 2 CPU cores, about 8 minutes
    python examples/tuned_lens.py --model Qwen/Qwen2.5-1.5B --device cuda --steps 1000 --n-prompts 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hookedcot.dictionaries import train_tuned_lens  # noqa: E402
from hookedcot.interp import run_logit_lens  # noqa: E402

PROMPTS = [
    "Explain how a rainbow forms.", "Write a short story about a lost key.", "What is 17 times 23? Think step by step.",
    "Describe the water cycle.", "Give three tips for learning a language.", "Why is the sky blue?",
    "A train leaves at 3 pm and travels 120 km at 60 km per hour. When does it arrive?",
    "Summarise the plot of Romeo and Juliet.", "How do vaccines work?", "Write a haiku about autumn.",
    "What causes the seasons on Earth?", "Tom has 12 apples and gives away 5. How many are left? Explain.",
    "List the planets of the solar system.", "How does a computer store numbers?", "What is photosynthesis?",
    "Describe your ideal weekend.", "Sara reads 14 pages a day for 6 days. How many pages does she read?",
    "Explain what a prime number is.",
]
PROBE = ("Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA: 3 + 4 = ", "7")  # digits are tokens


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tuned_lens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--n-prompts", type=int, default=18, help="prompts to sample text from (cycled past the built-in 18)")
    p.add_argument("--held-out", type=int, default=3, help="texts kept for evaluation")
    p.add_argument("--max-new-tokens", type=int, default=150)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="hookedcot_out/tuned_lens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    model = C.load_model(args)
    prompts = [model.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
               for i in range(args.n_prompts)]
    with C.step(f"sampling {len(prompts)} texts of ≤ {args.max_new_tokens} tokens"):
        texts = [model.generate(p, args.max_new_tokens, do_sample=True, temperature=0.8, seed=args.seed + i,
                                return_type="tokens")[0] for i, p in enumerate(prompts)]  # the model's own tokens
    train, held = texts[: -args.held_out], texts[-args.held_out:]  # token ids [pos] each
    with C.step(f"training the tuned lens ({args.steps} steps)") as s:
        lens, losses = train_tuned_lens(model, train, steps=args.steps, lr=args.lr, seed=args.seed)
    train_s = s.seconds
    lens.save(out / "lens")
    kl = {"tuned": torch.zeros(model.cfg.n_layers), "logit": torch.zeros(model.cfg.n_layers)}
    n_tokens = 0
    for tokens in held:
        per = lens.kl_per_layer(model, tokens[None])
        for k in kl:
            kl[k] += per[k] * len(tokens)
        n_tokens += len(tokens)
    kl = {k: v / n_tokens for k, v in kl.items()}
    lenses = {name: run_logit_lens(model, PROBE[0], targets=PROBE[1], tuned=lens if name == "tuned" else None)
              for name in ("logit", "tuned")}
    for name, result in lenses.items():
        result.plot(out / name)
    plot_kl(out / "kl_per_layer.png", kl)
    runtime = time.perf_counter() - t_start
    results = {"args": vars(args), "train_tokens": sum(len(t) for t in train),
               "held_out_tokens": n_tokens, "train_seconds": train_s, "losses": losses,
               "kl_per_layer": {k: v.tolist() for k, v in kl.items()},
               "mean_kl": {k: float(v.mean()) for k, v in kl.items()}, "runtime_seconds": runtime}
    rows = [f"| {i} | {kl['logit'][i]:.3f} | {kl['tuned'][i]:.3f} |" for i in range(model.cfg.n_layers)]
    summary = [
        "# tuned_lens", "",
        f"- model: `{args.model}` ({model.cfg.n_layers} layers, {model.dtype}, {model.device})",
        f"- data: {len(train)} sampled texts ({results['train_tokens']} tokens) to train, {len(held)} held out "
        f"({n_tokens} tokens); {args.steps} steps, lr {args.lr}, {train_s:.0f} s", "",
        "Mean KL(final ‖ lens) per layer on the held-out tokens (nats; row i reads `blocks.i.hook_resid_pre`):", "",
        "| layer | logit lens | tuned lens |", "|---|---|---|", *rows,
        f"| mean | {results['mean_kl']['logit']:.3f} | {results['mean_kl']['tuned']:.3f} |", "",
        f"Tuned below logit at {int((kl['tuned'] < kl['logit']).sum())} of {model.cfg.n_layers} layers.",
        f"Figures: kl_per_layer.png; logit/ and tuned/ (P({PROBE[1]!r}) over layers and positions of the probe). "
        f"Runtime {runtime:.0f} s.",
    ]
    C.write_outputs(out, results, summary)
    print("\n".join(summary[-3:]), flush=True)
    return results


def plot_kl(path: Path, kl: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for name, values in kl.items():
        ax.plot(range(len(values)), values.tolist(), marker="o", ms=3, label=f"{name} lens")
    ax.set_yscale("log")
    ax.set_xlabel("layer (residual entering the block)")
    ax.set_ylabel("KL(final ‖ lens), nats")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
