"""`hookedcot demo | lens | patch`: the main job and two research commands, each writing a results folder."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"


def _load(name: str, dtype: str | None, device: str | None) -> Any:
    from hookedcot import HookedCoT

    t = time.perf_counter()
    print(f"loading {name} ...", flush=True)
    model = HookedCoT.from_pretrained(name, dtype=dtype, device=device)
    print(f"  {model}  [{time.perf_counter() - t:.1f} s]", flush=True)
    return model


@torch.no_grad()
def next_token_lens(model: Any, tokens: torch.Tensor, positions: list[int]) -> dict[str, torch.Tensor]:
    """For each position, the probability and rank every layer's residual (through the final norm
    and unembedding) gives the token that actually comes next: [layer + 1, len(positions)]."""
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)] + [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    resid = cache.accumulated_resid(pos_slice=None)[:, 0, positions]  # [layers+1, n, d]
    nxt = tokens[0, [p + 1 for p in positions]]
    probs, ranks = [], []
    for row in resid:
        logits = model.unembed_resid(row).float()  # [n, vocab]
        target = logits.gather(-1, nxt[:, None])
        probs.append(logits.softmax(-1).gather(-1, nxt[:, None])[:, 0])
        ranks.append((logits > target).sum(-1).float())
    return {"prob": torch.stack(probs), "rank": torch.stack(ranks)}


DEMO_QUESTION = "Tom has 3 apples and buys 2 more. How many apples does Tom have?"
DEMO_ANSWER = 5
# "3 + 2 =" in the model's own reasoning: the operands, the operator, the equals sign.
CALCULATION = re.compile(r"(\d+) ?([-+*x×]) ?(\d+) ?= ?")


def final_number(text: str) -> int | None:
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def calculation_pair(model: Any, tokens: torch.Tensor, n_prompt: int) -> dict[str, Any] | None:
    """From a chain of thought that writes a calculation ("3 + 2 = 5"), a clean/corrupted pair for
    patching: the trace cut just before the result, and the same trace with the first operand's
    last digit changed. None when the reasoning writes no such calculation."""
    completion = model.to_string(tokens[0, n_prompt:])
    match = CALCULATION.search(completion)
    if match is None:
        return None
    span = model.find_positions(tokens[0], match.group(0).rstrip())
    # the last token spelling the calculation ends it ("=" or " ="); the result starts after the space
    cut = span[-1] + 1
    while cut < tokens.shape[1] and not model.to_str_tokens(tokens[0, cut : cut + 1])[0].strip():
        cut += 1
    digits = [p for p in span if model.to_str_tokens(tokens[0, p : p + 1])[0].strip().isdigit()]
    operand = len(match.group(1))  # the first operand's digits are the first `operand` digit tokens
    changed = digits[min(operand, len(digits)) - 1]
    old = model.to_str_tokens(tokens[0, changed : changed + 1])[0].strip()
    new = str((int(old) + 1) % 10) if old != "9" else "8"
    clean = tokens[:, :cut]
    corrupted = clean.clone()
    corrupted[0, changed] = model.to_single_token(new)
    return {"clean": clean, "corrupted": corrupted, "changed": changed, "old": old, "new": new,
            "calculation": match.group(0).strip(), "first": n_prompt}


def demo(args: argparse.Namespace) -> int:
    from hookedcot.interp.results import Result
    from hookedcot.interp.sweeps import patch_layer_position

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _load(args.model, args.dtype, args.device)

    # 1. A word problem through the chat template; the model reasons and answers (greedy).
    prompt = model.apply_chat_template([{"role": "user", "content": args.question}])
    print(f"\nQ: {args.question}", flush=True)
    t = time.perf_counter()
    tokens = model.generate(prompt, args.max_new_tokens, return_type="tokens")
    n_prompt = model.to_tokens(prompt).shape[1]
    completion = model.to_string(tokens[0, n_prompt:])
    print(f"A: {completion.strip()}\n  [{tokens.shape[1] - n_prompt} tokens in {time.perf_counter() - t:.1f} s]", flush=True)
    given = final_number(completion)
    expected = DEMO_ANSWER if args.expected is None and args.question == DEMO_QUESTION else args.expected
    verdict = "" if expected is None else f" (expected {expected}: {'correct' if given == expected else 'wrong'})"
    print(f"  final number: {given}{verdict}", flush=True)

    # 2. Logit lens over the answer: at each answer position, P(the token the model wrote next).
    positions = list(range(n_prompt - 1, tokens.shape[1] - 1))
    lens = next_token_lens(model, tokens, positions)
    labels = [repr(t) for t in model.to_str_tokens(tokens[0, n_prompt : tokens.shape[1]])]
    rows = [f"{i}_pre" for i in range(model.cfg.n_layers)] + ["final_post"]
    prob = Result(lens["prob"], ("layer", "position"), {"layer": rows, "position": labels}, name="lens_next_token_prob")
    rank = Result(lens["rank"], ("layer", "position"), {"layer": rows, "position": labels}, name="lens_next_token_rank")
    top_share = (lens["rank"] == 0).float().mean(dim=1)  # per layer: share of positions where the written token is top
    forms = next((i for i in range(len(rows)) if float(top_share[i]) >= 0.5), len(rows) - 1)
    prob.plot(out / "lens_answer.png", title="logit lens over the answer: P(the token written next)", cmap="viridis",
              center=None, value_label="probability",
              caption=f"Each column is a token the model wrote; each row reads the residual entering that layer through the "
                      f"final norm and unembedding. From row {rows[forms]} on, at least half of the written tokens are "
                      "already the top prediction.")
    prob.save(out), rank.save(out)
    print(f"logit lens: {len(positions)} answer positions x {len(rows)} layers -> {out / 'lens_answer.png'}\n"
          f"  the written token is the top prediction at >= half the positions from {rows[forms]} on", flush=True)

    # 3. Patching inside the chain of thought: which (layer, position) carries the operand the
    #    result is computed from?
    summary: dict[str, Any] = {"model": args.model, "question": args.question, "completion": completion,
                               "final_number": given, "expected": expected}
    pair = calculation_pair(model, tokens, n_prompt)
    if pair is None:
        print("\nthe reasoning writes no calculation like '3 + 2 =': skipping the patching step", flush=True)
    else:
        with torch.no_grad():
            clean_logits = model(pair["clean"], last_logits_only=True)[0, -1].float()
            corrupt_logits = model(pair["corrupted"], last_logits_only=True)[0, -1].float()
        clean_id, corrupt_id = int(clean_logits.argmax()), int(corrupt_logits.argmax())
        clean_tok, corrupt_tok = model.to_str_tokens([clean_id, corrupt_id])
        gap_clean = float(clean_logits[clean_id] - clean_logits[corrupt_id])
        gap_corrupt = float(corrupt_logits[clean_id] - corrupt_logits[corrupt_id])

        def recovery(logits: torch.Tensor) -> torch.Tensor:
            """The answer's logit difference, 0 at the corrupted run and 1 at the clean run."""
            diff = logits[:, -1, clean_id].float() - logits[:, -1, corrupt_id].float()
            return (diff - gap_corrupt) / (gap_clean - gap_corrupt)

        print(f"\npatching: the reasoning writes {pair['calculation']!r} and continues {clean_tok!r}; with its "
              f"{pair['old']!r} (position {pair['changed']}) changed to {pair['new']!r} it continues {corrupt_tok!r}", flush=True)
        if clean_id == corrupt_id:
            print("  the change does not change the prediction: nothing to patch", flush=True)
        else:
            t = time.perf_counter()
            result = patch_layer_position(model, pair["clean"], pair["corrupted"], metric=recovery,
                                          layers=range(0, model.cfg.n_layers, args.layer_step),
                                          positions=f"from {pair['first']}", progress=False)
            secs = time.perf_counter() - t
            result.name = "patch_resid_pre_recovery"
            where = result.labels["position"]
            changed_label = pair["changed"] - pair["first"]  # the tick shows the clean token and its replacement
            where[changed_label] = f"{pair['changed']} {pair['old']!r}->{pair['new']!r}"
            result.save(out)
            carrier = result.values.argmax(dim=1)  # per layer, the position that carries most
            moved = next((i for i, p in enumerate(carrier.tolist()) if p != carrier[0]), None)
            layer = result.labels["layer"]
            story = (f"the changed digit's position carries it up to layer {layer[moved - 1]}; from layer {layer[moved]} on, "
                     f"position {where[int(carrier[moved])]} does" if moved is not None else
                     f"position {where[int(carrier[0])]} carries it at every layer")
            result.plot(out / "patching.png", cmap="Reds", center=None, value_label="recovery of the clean answer",
                        title=f"patching resid_pre clean -> corrupted: logit diff {clean_tok!r} - {corrupt_tok!r}, normalised",
                        caption=f"Each cell patches one layer's residual at one position from the clean trace into the "
                                f"corrupted one (0 = corrupted answer, 1 = clean answer): {story}.")
            print(f"  {result.values.numel()} (layer, position) sites in {secs:.1f} s -> {out / 'patching.png'}\n"
                  f"  {story}", flush=True)
            summary.update(calculation=pair["calculation"], changed_position=pair["changed"], clean_next=clean_tok,
                           corrupted_next=corrupt_tok, patching=story)
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out}/demo.json, lens_answer.png" + (", patching.png" if "patching" in summary else ""))
    return 0


def lens_cmd(args: argparse.Namespace) -> int:
    from hookedcot.interp.lens import run_logit_lens

    model = _load(args.model, args.dtype, args.device)
    lens = run_logit_lens(model, args.prompt, targets=args.target or None, positions=_positions(args.positions), top_k=args.top_k)
    lens.save(args.out)
    paths = lens.plot(args.out) if args.target else []
    last = lens.top_tokens[-1][-1]
    print(f"final-layer top-{args.top_k} at the last position: {last}")
    print(f"wrote {args.out} ({len(paths)} heatmaps)")
    return 0


def patch_cmd(args: argparse.Namespace) -> int:
    from hookedcot.interp.data import format_prompt, load_pairs
    from hookedcot.interp.sweeps import patch_layer_position

    model = _load(args.model, args.dtype, args.device)
    if args.pairs:
        pairs = [(format_prompt(p.clean, args.style, model), format_prompt(p.corrupted, args.style, model)) for p in load_pairs(args.pairs)]
    elif args.clean and args.corrupted:
        pairs = [(args.clean, args.corrupted)]
    else:
        print("give --clean and --corrupted prompts, or --pairs FILE.json", file=sys.stderr)
        return 2
    out = Path(args.out)
    for i, (clean, corrupted) in enumerate(pairs):
        result = patch_layer_position(model, clean, corrupted, hook=args.hook, positions=_positions(args.positions))
        result.save(out, f"pair{i}_{result.name}.json")
        result.plot(out / f"pair{i}_{result.name}.png", cmap="Reds", center=None, value_label="KL(patched || corrupted)")
        print(f"pair {i}: max KL {float(result.values.max()):.4f} -> {out}/pair{i}_{result.name}.png")
    return 0


def cot_cmd(args: argparse.Namespace) -> int:
    """Thought-Anchors anatomy of one trace: every step's importance, a table, figures, a page."""
    from hookedcot.cot.analysis import analyze_cot

    model = _load(args.model, args.dtype, args.device)
    think = None if args.no_think else tuple(args.think.split(",", 1))
    if think is not None and len(think) != 2:
        raise SystemExit(f"--think {args.think!r}: give the opening and closing delimiters as 'open,close', "
                         "e.g. '<think>,</think>', or --no-think")
    result = analyze_cot(
        model, args.prompt, measures=args.measures.split(","), correct_answer=args.correct_answer, chat=not args.no_chat,
        think=think, max_trace_tokens=args.max_trace_tokens, n_rollouts=args.n_rollouts, temperature=args.temperature,
        top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, rollout_dir=Path(args.out) / "rollouts")
    paths = result.write(args.out)
    print(result.summary())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _positions(spec: str | None) -> Any:
    """A position spec from the command line: 'all', 'last N', 'from N', 'A:B' (a slice) or '3,7,-1'."""
    if not spec or spec == "all":
        return None
    if spec.split()[0] in ("last", "from"):
        return spec
    if ":" in spec:
        start, stop = (int(x) if x else None for x in spec.split(":", 1))
        return slice(start, stop)
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--positions {spec!r}: use 'all', 'last N', 'from N', 'A:B' or comma-separated ints") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hookedcot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, hub id, .gguf file or embedded name")
        p.add_argument("--dtype", default=None, help="float32 (default for GGUF), bfloat16, float16")
        p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
        p.add_argument("--out", default=out, help="results folder")

    d = sub.add_parser("demo", help="reason through a word problem, logit-lens the answer, patch inside the reasoning")
    common(d, "hookedcot_out/demo")
    d.add_argument("--question", default=DEMO_QUESTION)
    d.add_argument("--expected", type=int, default=None, help="the right answer, to say whether the model got it")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--layer-step", type=int, default=1, help="patch every N-th layer (1: all)")
    d.set_defaults(fn=demo)

    lp = sub.add_parser("lens", help="logit lens of a prompt")
    common(lp, "hookedcot_out/lens")
    lp.add_argument("--prompt", required=True)
    lp.add_argument("--target", action="append", help="target token (repeatable), e.g. ' 84'")
    lp.add_argument("--positions", help="'all' (default), 'last N', 'from N', 'A:B' or '3,7,-1'")
    lp.add_argument("--top-k", type=int, default=5)
    lp.set_defaults(fn=lens_cmd)

    pp = sub.add_parser("patch", help="layer × position activation patching of clean into corrupted")
    common(pp, "hookedcot_out/patch")
    pp.add_argument("--clean")
    pp.add_argument("--corrupted")
    pp.add_argument("--pairs", help="pairs JSON (see README)")
    pp.add_argument("--style", default="qa", choices=["qa", "plain", "chat"])
    pp.add_argument("--hook", default="resid_pre")
    pp.add_argument("--positions", default=None, help="'all' (default), 'last N', 'from N', 'A:B' or '3,7,-1'")
    pp.set_defaults(fn=patch_cmd)

    cp = sub.add_parser("cot", help="which steps of a chain of thought matter: rollouts, forced answers, attention")
    common(cp, "hookedcot_out/cot")
    cp.add_argument("--prompt", required=True, help="the question (through the chat template unless --no-chat)")
    cp.add_argument("--correct-answer", default=None, help="scored by accuracy and forced answers (default: the trace's own)")
    cp.add_argument("--n-rollouts", type=int, default=8, help="rollouts per cut point")
    cp.add_argument("--max-new-tokens", type=int, default=128, help="per rollout")
    cp.add_argument("--max-trace-tokens", type=int, default=512, help="for the greedy trace itself")
    cp.add_argument("--temperature", type=float, default=0.6)
    cp.add_argument("--top-p", type=float, default=0.95)
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--measures", default="resampling,counterfactual,forced,attention,suppression")
    cp.add_argument("--think", default="<think>,</think>", help="the reasoning's delimiters, comma-separated")
    cp.add_argument("--no-think", action="store_true", help="no delimiters: the whole completion is the reasoning")
    cp.add_argument("--no-chat", action="store_true", help="use the prompt as it is, without the chat template")
    cp.set_defaults(fn=cot_cmd)

    args = parser.parse_args(argv)
    from hookedcot import retain_freed_memory

    retain_freed_memory()  # a command-line run owns its process: repeated caches reuse freed memory
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
