"""Seed 000 — causal criticality of layers in chain-of-thought: noise + restoration, logit lens,
MLP ablation, a neuron trace.

Each problem is "Q: {question}\\nA:" followed by its reference reasoning, teacher forced, up to
"The answer is " — the last position predicts the answer's first digit.
1. Causal tracing: Gaussian noise (σ in units of the embedding matrix's std) on the question's
   tokens, then each (layer, position) of the residual restored from the clean run alone
   (`trace_restoration`); normalized recovery of P(clean answer digit).
2. Logit lens over the reasoning and answer: P(correct answer digit) and P(the next token) per
   layer × position.
3. Zero-ablation of one MLP (`--ablate-layer`, default 4/5 of the depth) over the reasoning and
   answer positions: the change of log P(correct answer digit), per problem.
4. A neuron of that MLP (`--neuron`, default: the largest activation variance over the sequence)
   traced over the teacher-forced sequence and during the model's own greedy generation.

    python examples/seed000_layer_criticality.py                       # SmolLM2-135M, CPU
    python examples/seed000_layer_criticality.py --model Qwen/Qwen2-1.5B --device cuda \\
        --n-pairs 6 --sigma 2 --trace-span cot --ablate-layer 24
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hookedcot import get_act_name  # noqa: E402
from hookedcot.interp import (  # noqa: E402
    Result, ablate_zero, add_noise, run_logit_lens, trace_neurons, trace_neurons_while_generating, trace_restoration,
)


def parse(argv: list[str] | None):
    p = C.base_parser("seed000_layer_criticality", __doc__, n_pairs=3)  # --n-pairs: problems (their clean sides)
    p.add_argument("--sigma", type=float, default=3.0, help="noise σ in units of std(W_E) (ROME: 3)")
    p.add_argument("--noise", default="question", choices=["question", "question+cot"], help="which tokens are noised")
    p.add_argument("--trace-span", default="last 16", help="positions restored: 'last N', 'cot' or 'all'")
    p.add_argument("--trace-layer-step", type=int, default=1, help="restore every N-th layer")
    p.add_argument("--ablate-layer", type=int, default=None, help="MLP to zero-ablate (default: 4/5 of the depth)")
    p.add_argument("--neuron", type=int, default=None, help="neuron of that layer's mlp.hook_post to trace")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated for the neuron trace")
    return p.parse_args(argv)


def problem_sequence(model, problem):
    """(tokens [1, pos] ending just before the answer's first digit, that digit's id, cot_start,
    question positions, teacher-forced sequence with the whole answer [1, pos'])."""
    made = C.problem_tokens(model, problem)
    if made is None:
        return None
    tokens, cot_start, _, answer = made
    k = next((i for i, t in enumerate(answer) if model.to_string([t]).strip()), 0)
    seq = torch.cat([tokens, tokens.new_tensor(answer[:k])])[None]
    q_start = model.to_tokens("Q:").shape[1]
    q_end = model.to_tokens(f"Q: {problem.question}").shape[1]
    return seq, answer[k], cot_start, list(range(q_start, q_end)), torch.cat([seq[0], seq.new_tensor(answer[k:])])[None]


def trace_positions(n_pos: int, cot_start: int, spec: str) -> list[int]:
    if spec == "all":
        return list(range(n_pos))
    if spec == "cot":
        return list(range(cot_start, n_pos))
    if spec.startswith("last "):
        return list(range(max(0, n_pos - int(spec.split()[1])), n_pos))
    raise ValueError(f"--trace-span {spec!r}: use 'last N', 'cot' or 'all'")


@torch.no_grad()
def answer_logprob(model, seq, digit, fwd_hooks=()) -> float:
    return float(model.run_with_hooks(seq, fwd_hooks=list(fwd_hooks))[0, -1].float().log_softmax(-1)[digit])


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = C.load_model(args)
    n_layers = model.cfg.n_layers
    ablate = args.ablate_layer if args.ablate_layer is not None else round(0.8 * n_layers)
    problems = [(p.clean, s) for p in C.problem_pool(args) if (s := problem_sequence(model, p.clean))][: args.n_pairs]
    if not problems:
        raise SystemExit("no usable problem (the tokenizer merges the answer with the text before it)")
    problem, (seq, digit, cot_start, question_pos, full) = problems[0]
    digit_str = model.to_string([digit])
    print(f"problem 1: answer {problem.answer}; predicting its digit {digit_str!r} at position {seq.shape[1] - 1}", flush=True)

    # 1. noise the question, restore one (layer, position) at a time
    noised = question_pos if args.noise == "question" else list(range(question_pos[0], seq.shape[1] - 1))
    layers = C.layer_list(model, args.trace_layer_step)
    positions = trace_positions(seq.shape[1], cot_start, args.trace_span)
    with C.step(f"restoration sweep: {len(layers)} layers × {len(positions)} positions, σ = {args.sigma}"):
        restore = trace_restoration(model, seq, noised, sigma=args.sigma, layers=layers, positions=positions,
                                    seed=args.seed, progress=False)
    noise = add_noise("hook_embed", args.sigma, noised, args.seed, True, model)
    p_clean, p_noisy = (answer_logprob(model, seq, digit, h) for h in ((), [noise]))
    restore.plot(out / "restoration.png", title=f"noised {args.noise} (σ={args.sigma}), one site restored",
                 value_label=f"normalized recovery of P({digit_str!r})")
    best = divmod(int(restore.values.nan_to_num(-1e9).argmax()), len(positions))
    best_site = {"layer": layers[best[0]], "position": restore.labels["position"][best[1]],
                 "recovery": float(restore.values[best])}
    by_layer = restore.values.nan_to_num(0).max(1).values

    # 2. logit lens over the reasoning and the answer (teacher forced)
    lens_pos = list(range(cot_start - 1, full.shape[1] - 1))
    nxt = full[0, [p + 1 for p in lens_pos]].tolist()
    targets = sorted(set(nxt) | {digit})
    with C.step(f"logit lens: {n_layers + 1} rows × {len(lens_pos)} positions"):
        lens = run_logit_lens(model, full, targets=targets, positions=lens_pos)
    rows = lens.rows
    p_digit = Result(lens.prob.values[targets.index(digit)], ("layer", "position"),
                     {"layer": rows, "position": lens.position_labels}, name="lens_p_answer_digit")
    p_next = Result(torch.stack([lens.prob.values[targets.index(t), :, i] for i, t in enumerate(nxt)], 1),
                    ("layer", "position"), {"layer": rows, "position": lens.position_labels}, name="lens_p_next_token")
    p_digit.plot(out / "lens_answer_digit.png", title=f"logit lens: P({digit_str!r}, the answer's first digit)",
                 cmap="viridis", center=None, value_label="probability")
    p_next.plot(out / "lens_next_token.png", title="logit lens: P(the next token of the reasoning)", cmap="viridis",
                center=None, value_label="probability")
    at_answer = p_digit.values[:, seq.shape[1] - 1 - lens_pos[0]]
    crystal = next((rows[j] for j in range(len(rows)) if all(at_answer[j:] > 0.5)), None)

    # 3. zero-ablate one MLP over the reasoning and answer positions
    ablation = []
    with C.step(f"zero-ablating blocks.{ablate}.hook_mlp_out from the reasoning on, {len(problems)} problems"):
        for prob, (s, d, start, _, _) in problems:
            hook = ablate_zero(get_act_name("mlp_out", ablate), positions=f"from {start}")
            base, ablated = answer_logprob(model, s, d), answer_logprob(model, s, d, [hook])
            ablation.append({"answer": prob.answer, "logp": base, "logp_ablated": ablated, "delta": ablated - base})
    mean_delta = sum(a["delta"] for a in ablation) / len(ablation)

    # 4. one neuron of that layer, on the sequence and during generation
    with C.step("neuron traces"):
        _, cache = model.run_with_cache(full, names_filter=get_act_name("post", ablate))
        neuron = args.neuron if args.neuron is not None else int(cache[get_act_name("post", ablate)][0].var(0).argmax())
        trace = trace_neurons(model, full, ablate, neuron)
        prompt = model.to_tokens(C.cot_text(problem)[0])
        gen = trace_neurons_while_generating(model, prompt, ablate, neuron, max_new_tokens=args.max_new_tokens)
    trace.plot(out / "neuron_teacher_forced.png", title=f"L{ablate} N{neuron} on the teacher-forced reasoning", value_label="activation")
    gen.plot(out / "neuron_generation.png", title=f"L{ablate} N{neuron} on the prompt and during greedy generation "
             f"(from position {gen.meta['prompt_len']})", value_label="activation")
    top = trace.values.argsort(descending=True)[:8].tolist()
    top_tokens = [f"{model.to_string(full[0, j:j + 1])!r}@{j}" for j in top]
    completion = model.to_string(gen.meta["tokens"][prompt.shape[1]:])
    numbers = re.findall(r"-?\d+", completion.replace(",", ""))
    correct = bool(numbers) and int(numbers[-1]) == problem.answer

    runtime = time.perf_counter() - t_start
    results = {"seed": "000", "args": vars(args), "problem": {"question": problem.question, "answer": problem.answer},
               "restoration": {**restore.to_dict(), "p_clean": p_clean, "p_noisy": p_noisy, "best_site": best_site,
                               "max_recovery_by_layer": dict(zip(map(str, layers), by_layer.tolist()))},
               "logit_lens": {"p_answer_digit": p_digit.to_dict(), "p_next_token": p_next.to_dict(),
                              "p_answer_digit_at_answer_position": dict(zip(rows, at_answer.tolist())),
                              "crystallizes_at": crystal},
               "mlp_ablation": {"layer": ablate, "per_problem": ablation, "mean_delta_logp": mean_delta},
               "neuron": {"layer": ablate, "neuron": neuron, "teacher_forced": trace.to_dict(), "generation": gen.to_dict(),
                          "top_tokens": top_tokens, "completion": completion, "completion_correct": correct},
               "runtime_seconds": runtime}
    summary = C.run_header(args, model, "seed000_layer_criticality", "problems") + [
        f"Problem 1: {problem.question} (answer {problem.answer}); scored token: {digit_str!r}.", "",
        f"**Restoration.** Noise σ = {args.sigma} × std(W_E) on the {args.noise} ({len(noised)} tokens): "
        f"log P({digit_str!r}) {p_clean:.3f} clean → {p_noisy:.3f} noisy. Restoring one resid_pre site "
        f"({len(layers)} layers × {len(positions)} positions, `--trace-span {args.trace_span}`): best recovery "
        f"{best_site['recovery']:.2f} at layer {best_site['layer']}, position:token {best_site['position']!r} (the answer "
        f"position is {seq.shape[1] - 1}). Max recovery per layer: "
        + ", ".join(f"{layer}: {v:.2f}" for layer, v in zip(layers, by_layer.tolist())) + ".", "",
        f"**Logit lens** (teacher forced, {len(lens_pos)} positions): P({digit_str!r}) at the answer position by layer: "
        + ", ".join(f"{r} {v:.2f}" for r, v in list(zip(rows, at_answer.tolist()))[:-1:3]) + f", final {float(at_answer[-1]):.2f}. "
        + (f"It stays above 0.5 from row {crystal} on (crystallization)." if crystal else "It never stays above 0.5."), "",
        f"**MLP ablation** (blocks.{ablate}.hook_mlp_out zeroed from the reasoning on): Δ log P(answer digit) "
        + ", ".join(f"{a['delta']:+.3f}" for a in ablation) + f"; mean {mean_delta:+.3f} "
        f"({'removing it lowers P(answer): the MLP contributes' if mean_delta < 0 else 'removing it does not lower P(answer)'}).", "",
        f"**Neuron** L{ablate} N{neuron} (mlp.hook_post; {'chosen' if args.neuron is not None else 'largest variance'}): "
        f"strongest on (token@position) {', '.join(top_tokens)}. Greedy completion ({args.max_new_tokens} tokens, last "
        f"number {'correct' if correct else 'not the answer'}): {completion.strip()!r}.", "",
        "Figures: restoration.png, lens_answer_digit.png, lens_next_token.png, neuron_teacher_forced.png, "
        f"neuron_generation.png. Total runtime {runtime:.1f} s.",
    ]
    C.write_outputs(out, results, summary)
    print(f"restoration: best {best_site}; lens crystallizes at {crystal}; MLP L{ablate} ablation mean Δlog p "
          f"{mean_delta:+.3f}; neuron {neuron}")
    print(f"total runtime {runtime:.1f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
