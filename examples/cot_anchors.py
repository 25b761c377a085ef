"""Thought anchors — which steps of a chain of thought matter (Bogdan, Macar, Nanda, Conmy 2025).

The model answers a word problem through its chat template (greedy); its reasoning is cut into
sentences and each sentence is measured five ways: resampling importance (how the distribution of
final answers moves when the trace is resampled from just before the sentence vs just after it),
counterfactual importance (the same, keeping only resamples whose new sentence means something
else), forced importance (how the answer's log-probability moves when the answer is forced right
after the sentence), the attention later sentences pay it in the receiver heads (vertical score),
and attention suppression (the KL on each later sentence when no head may read it).

Writes `results.json` (every number), `summary.md` (the per-step table), `cot.html` (the trace,
shaded; click a step for its links), PNG figures, `cot.json` and `rollouts/` (resumable).

    python examples/cot_anchors.py                                   # SmolLM2-135M, 6 rollouts, CPU, ~1 min
    python examples/cot_anchors.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --device cuda \\
        --dtype bfloat16 --think "<think>,</think>" --n-rollouts 100 --max-new-tokens 2048 \\
        --max-trace-tokens 4096 --proximity 4 --question "..." --correct-answer "..."
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hookedcot.cot.analysis import MEASURES, analyze_cot  # noqa: E402

QUESTION = "There are 12 students in a class. Half of them are girls. How many boys are in the class?"
ANSWER = "6"  # SmolLM2-135M-Instruct answers 6, greedily, in 7 sentences (the reasoning itself is shaky)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cot_anchors", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL, help="HF folder, hub id, .gguf file or embedded model name")
    p.add_argument("--out", default="hookedcot_out/cot_anchors", help="results folder")
    p.add_argument("--seed", type=int, default=0, help="the rollouts' base seed")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps ...")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's / float32)")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--correct-answer", default=ANSWER)
    p.add_argument("--n-rollouts", type=int, default=6, help="rollouts per cut point (the paper: 100)")
    p.add_argument("--max-new-tokens", type=int, default=160,
                   help="per rollout (a rollout cut off before it answers counts as no answer)")
    p.add_argument("--max-trace-tokens", type=int, default=256, help="for the greedy trace")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--think", default=None, help="the reasoning's delimiters, e.g. '<think>,</think>' "
                                                 "(default: none, the whole answer is the reasoning)")
    p.add_argument("--measures", default=",".join(MEASURES))
    p.add_argument("--proximity", type=int, default=2,
                   help="vertical scores count attention from steps at least this many later (the paper: 4, for "
                        "traces of dozens of sentences; on the embedded model's 7 sentences 2 leaves 5 scored steps)")
    p.add_argument("--top-k-heads", type=int, default=16, help="receiver heads: the top heads by kurtosis")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    args = parse(argv)
    out = Path(args.out)
    model = C.load_model(args)
    with C.step("analysing the trace"):
        result = analyze_cot(
            model, args.question, measures=args.measures.split(","), correct_answer=args.correct_answer,
            think=tuple(args.think.split(",", 1)) if args.think else None, max_trace_tokens=args.max_trace_tokens,
            n_rollouts=args.n_rollouts, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, seed=args.seed, proximity=args.proximity,
            top_k_heads=args.top_k_heads, rollout_dir=out / "rollouts")
    paths = result.write(out)
    cot = result.cot
    runtime = time.perf_counter() - t0
    results = {"example": "cot_anchors", "args": vars(args), "question": args.question, "answer": cot.answer,
               "correct": cot.is_correct, "n_steps": cot.n_steps, "trace_tokens": len(cot.tokens),
               "analysis": result.to_dict(), "seconds": result.seconds, "runtime_seconds": runtime}
    options = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items() if v is not None)
    summary = [
        "# cot_anchors", "",
        f"- model: `{args.model}` ({model.cfg.n_layers} layers, {model.dtype}, {model.device})",
        f"- question: {args.question}", f"- answer: {cot.answer!r} (correct: {cot.is_correct})",
        f"- {args.n_rollouts} rollouts per cut point, temperature {args.temperature}, top-p {args.top_p}, "
        f"≤ {args.max_new_tokens} new tokens, seed {args.seed}",
        f"- time: {', '.join(f'{k} {v:.1f} s' for k, v in result.seconds.items())}; total {runtime:.1f} s",
        f"- receiver heads (layer, head, kurtosis): "
        + ", ".join(f"({l}, {h}, {k:.2f})" for l, h, k in result.receiver_heads()[:8]),
        f"- rerun: `python examples/cot_anchors.py {options}`", "",
        result.summary(), "",
        "Files: " + ", ".join(f"`{Path(p).name}`" for p in paths), "",
    ]
    C.write_outputs(out, results, summary)
    print("\n".join(summary), flush=True)
    return C.jsonable(results)


if __name__ == "__main__":
    main()
