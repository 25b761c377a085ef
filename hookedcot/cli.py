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
        logits = model.unembed(model.ln_final(row)).float()  # [n, vocab]
        target = logits.gather(-1, nxt[:, None])
        probs.append(logits.softmax(-1).gather(-1, nxt[:, None])[:, 0])
        ranks.append((logits > target).sum(-1).float())
    return {"prob": torch.stack(probs), "rank": torch.stack(ranks)}


def demo(args: argparse.Namespace) -> int:
    from hookedcot.interp.data import format_prompt, generate_pairs, same_length_pairs
    from hookedcot.interp.sweeps import patch_layer_position
    from hookedcot.interp.results import Result

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _load(args.model, args.dtype, args.device)

    # 1. Ask a GSM8K-style word problem through the chat template.
    problem = generate_pairs(1, seed=args.seed)[0].clean
    prompt = format_prompt(problem, "chat", model)
    print(f"\nQ: {problem.question}\n(expected answer: {problem.answer})", flush=True)
    t = time.perf_counter()
    tokens = model.generate(prompt, args.max_new_tokens, return_type="tokens", verbose=True)
    n_prompt = model.to_tokens(prompt).shape[1]
    completion = model.to_string(tokens[0, n_prompt:])
    new = tokens.shape[1] - n_prompt
    print(f"A: {completion.strip()}\n  [{new} tokens in {time.perf_counter() - t:.1f} s]", flush=True)
    numbers = re.findall(r"-?\d+", completion.replace(",", ""))
    given = int(numbers[-1]) if numbers else None
    print(f"  model's final number: {given} — {'correct' if given == problem.answer else 'wrong'}", flush=True)

    # 2. Logit lens over the answer: at each answer position, P(the token the model wrote next).
    positions = list(range(n_prompt - 1, tokens.shape[1] - 1))
    lens = next_token_lens(model, tokens, positions)
    labels = [repr(t)[1:-1] for t in model.to_str_tokens(tokens[0, n_prompt : tokens.shape[1]])]
    rows = [f"{i}_pre" for i in range(model.cfg.n_layers)] + ["final_post"]
    prob = Result(lens["prob"], ("layer", "position"), {"layer": rows, "position": labels}, name="lens_next_token_prob")
    rank = Result(lens["rank"], ("layer", "position"), {"layer": rows, "position": labels}, name="lens_next_token_rank")
    prob.plot(out / "lens_answer.png", title="logit lens over the answer: P(token written next)", cmap="viridis",
              center=None, value_label="probability")
    prob.save(out), rank.save(out)
    final_layer_agrees = bool((lens["rank"][-1] == 0).all())
    print(f"logit lens: {len(positions)} answer positions × {len(rows)} layers -> {out / 'lens_answer.png'}"
          f" (last layer ranks every written token first: {final_layer_agrees})", flush=True)

    # 3. Activation patching: which (layer, position) of the residual carries the changed number?
    pairs = same_length_pairs(model, generate_pairs(args.n_pairs, seed=args.seed), style="qa")
    if not pairs:
        print("no same-length clean/corrupted pair for this tokenizer; skipping patching", flush=True)
    else:
        pair = pairs[0]
        clean, corrupted = format_prompt(pair.clean, "qa"), format_prompt(pair.corrupted, "qa")
        ct, kt = model.to_tokens(clean)[0], model.to_tokens(corrupted)[0]
        first_diff = int((ct != kt).nonzero()[0, 0])
        span = list(range(first_diff, ct.shape[0]))[: args.patch_positions]
        if ct.shape[0] - 1 not in span:
            span = span[:-1] + [ct.shape[0] - 1]
        print(f"\npatching clean -> corrupted ({pair.clean.answer} vs {pair.corrupted.answer}); the numbers differ at "
              f"position {first_diff}", flush=True)
        t = time.perf_counter()
        result = patch_layer_position(model, clean, corrupted, positions=span, progress=True)
        secs = time.perf_counter() - t
        result.save(out)
        result.plot(out / "patching.png", title="KL(patched || corrupted) at the last position, resid_pre patched",
                    cmap="Reds", center=None, value_label="KL")
        best = divmod(int(result.values.argmax()), result.values.shape[1])
        print(f"patching: {result.values.numel()} (layer, position) sites in {secs:.1f} s "
              f"({result.values.numel() / secs:.1f} patched forwards/s) -> {out / 'patching.png'}\n"
              f"  strongest site: layer {result.labels['layer'][best[0]]}, token {result.labels['position'][best[1]]!r}", flush=True)

    summary = {"model": args.model, "question": problem.question, "expected": problem.answer, "completion": completion,
               "final_number": given, "correct": given == problem.answer, "answer_positions": positions,
               "final_layer_ranks_written_tokens_first": final_layer_agrees}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out}/demo.json, lens_answer.png, lens_next_token_prob.json" + (", patching.png" if pairs else ""))
    return 0


def lens_cmd(args: argparse.Namespace) -> int:
    from hookedcot.interp.lens import logit_lens

    model = _load(args.model, args.dtype, args.device)
    lens = logit_lens(model, args.prompt, targets=args.target or None, positions=_positions(args.positions), top_k=args.top_k)
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
        result = patch_layer_position(model, clean, corrupted, hook=args.hook, positions=args.positions or None)
        result.save(out, f"pair{i}_{result.name}.json")
        result.plot(out / f"pair{i}_{result.name}.png", cmap="Reds", center=None, value_label="KL(patched || corrupted)")
        print(f"pair {i}: max KL {float(result.values.max()):.4f} -> {out}/pair{i}_{result.name}.png")
    return 0


def _positions(spec: str | None) -> list[int] | None:
    return None if not spec else [int(x) for x in spec.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hookedcot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, hub id, .gguf file or embedded name")
        p.add_argument("--dtype", default=None, help="float32 (default for GGUF), bfloat16, float16")
        p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
        p.add_argument("--out", default=out, help="results folder")

    d = sub.add_parser("demo", help="answer a word problem, logit-lens the answer, patch a clean/corrupted pair")
    common(d, "hookedcot_out/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.add_argument("--n-pairs", type=int, default=12)
    d.add_argument("--patch-positions", type=int, default=24, help="patch at most N positions from the changed number on")
    d.set_defaults(fn=demo)

    lp = sub.add_parser("lens", help="logit lens of a prompt")
    common(lp, "hookedcot_out/lens")
    lp.add_argument("--prompt", required=True)
    lp.add_argument("--target", action="append", help="target token (repeatable), e.g. ' 84'")
    lp.add_argument("--positions", help="comma-separated positions (default: all)")
    lp.add_argument("--top-k", type=int, default=5)
    lp.set_defaults(fn=lens_cmd)

    pp = sub.add_parser("patch", help="layer × position activation patching of clean into corrupted")
    common(pp, "hookedcot_out/patch")
    pp.add_argument("--clean")
    pp.add_argument("--corrupted")
    pp.add_argument("--pairs", help="pairs JSON (see README)")
    pp.add_argument("--style", default="qa", choices=["qa", "plain", "chat"])
    pp.add_argument("--hook", default="resid_pre")
    pp.add_argument("--positions", default=None, help="'all', 'last N'")
    pp.set_defaults(fn=patch_cmd)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
