"""Shared plumbing for the seed examples: arguments, loading, clean/corrupted pair inputs, output.

A pair's two token sequences are `format_prompt(problem, "qa")` ("Q: ...\\nA:"), the problem's own
reference chain of thought (teacher forced) up to " The answer is", and whatever leading answer
tokens the clean and corrupted answers share (" " for digit-wise tokenizers, a shared first
digit). The last position is the *answer position*: it predicts the first token in which the two
answers differ (`clean_id` vs `corrupted_id`). The *reasoning span* (`cot`) is the chain of
thought's tokens, between "A:" and " The answer is" — the token analogue of the seeds' continuous
thoughts. Pairs whose sequences tokenize to different lengths are skipped: patching by position
needs position i to mean the same thing in both runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from hookedcot.interp.data import Problem, ProblemPair, format_prompt, generate_pairs, load_pairs

DEFAULT_MODEL = "smollm2-135m-instruct"


def base_parser(script: str, doc: str, n_pairs: int) -> argparse.ArgumentParser:
    """The options every example takes; scripts add their own."""
    p = argparse.ArgumentParser(prog=script, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, hub id, .gguf file or embedded model name")
    p.add_argument("--n-pairs", type=int, default=n_pairs, help="clean/corrupted pairs to analyse")
    p.add_argument("--pairs", default=None, help="pairs JSON (hookedcot.interp.data.load_pairs) instead of generated ones")
    p.add_argument("--out", default=f"hookedcot_out/{script}", help="results folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated problems (and of any noise)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps ...")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's / float32)")
    return p


def load_model(args: argparse.Namespace) -> Any:
    from hookedcot import HookedCoT

    with step(f"loading {args.model}"):
        model = HookedCoT.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    print(f"  {model}", flush=True)
    return model


class step:
    """`with step("what"):` prints what is running and how long it took."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> "step":
        print(f"{self.what} ...", flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        print(f"  [{self.what}: {self.seconds:.1f} s]", flush=True)


# ---------------------------------------------------------------- pairs
ANSWER_CUE = " The answer is"


@dataclass
class PairInputs:
    """One pair as equal-length token sequences [1, pos] and the answer tokens to score."""

    id: str
    clean_tokens: torch.Tensor
    corrupted_tokens: torch.Tensor
    first_diff: int  # first position where the two sequences differ
    cot_start: int  # first reasoning token (after "A:")
    cot_end: int  # where " The answer is" starts (exclusive end of the reasoning)
    clean_id: int  # the clean answer's token at the answer position (the last one)
    corrupted_id: int
    clean_answer: int
    corrupted_answer: int
    text: str  # the clean sequence as text

    @property
    def n_pos(self) -> int:
        return self.clean_tokens.shape[1]

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "n_tokens": self.n_pos, "first_diff": self.first_diff, "cot": [self.cot_start, self.cot_end],
                "clean_answer": self.clean_answer, "corrupted_answer": self.corrupted_answer,
                "clean_id": self.clean_id, "corrupted_id": self.corrupted_id}


def cot_text(problem: Problem) -> tuple[str, str]:
    """(prompt "Q: ...\\nA:", prompt + reference reasoning without its final " The answer is N.")."""
    prompt = format_prompt(problem, "qa")
    tail = f"{ANSWER_CUE} {problem.answer}."
    if not problem.reasoning.endswith(tail):
        raise ValueError(f"the reasoning should end with {tail!r}: {problem.reasoning!r}")
    return prompt, prompt + " " + problem.reasoning[: -len(tail)]


def problem_tokens(model: Any, problem: Problem) -> tuple[torch.Tensor, int, int, list[int]] | None:
    """(tokens of prompt + reasoning + " The answer is" [pos], cot_start, cot_end, the answer's
    tokens), or None where the tokenizer merges across those boundaries."""
    prompt, reasoning = cot_text(problem)
    parts = [model.to_tokens(t)[0] for t in (prompt, reasoning, reasoning + ANSWER_CUE,
                                             reasoning + ANSWER_CUE + f" {problem.answer}")]
    for shorter, longer in zip(parts, parts[1:]):
        if not torch.equal(longer[: len(shorter)], shorter):
            return None
    return parts[2], len(parts[0]), len(parts[1]), parts[3][len(parts[2]):].tolist()


def pair_inputs(model: Any, pair: ProblemPair) -> PairInputs | None:
    """The pair as equal-length sequences ending at the answer position, or None if they cannot be."""
    made = [problem_tokens(model, p) for p in (pair.clean, pair.corrupted)]
    if None in made:
        return None
    (clean, start, end, ans_c), (corrupted, start_k, end_k, ans_k) = made
    shared = 0
    while shared < min(len(ans_c), len(ans_k)) - 1 and ans_c[shared] == ans_k[shared]:
        shared += 1
    if ans_c[shared] == ans_k[shared] or (start, end) != (start_k, end_k):
        return None
    clean = torch.cat([clean, clean.new_tensor(ans_c[:shared])])
    corrupted = torch.cat([corrupted, corrupted.new_tensor(ans_k[:shared])])
    if clean.shape != corrupted.shape:
        return None
    diff = (clean != corrupted).nonzero()
    return PairInputs(pair.id or "pair", clean[None], corrupted[None], int(diff[0, 0]) if len(diff) else len(clean),
                      start, end, ans_c[shared], ans_k[shared], pair.clean.answer, pair.corrupted.answer,
                      model.to_string(clean))


def problem_pool(args: argparse.Namespace) -> list[ProblemPair]:
    return load_pairs(args.pairs) if args.pairs else generate_pairs(max(8, 6 * args.n_pairs), seed=args.seed)


def pick_pairs(model: Any, args: argparse.Namespace) -> list[PairInputs]:
    """`args.n_pairs` usable pairs (generated from `args.seed`, or read from `args.pairs`)."""
    pool = problem_pool(args)
    picked = []
    for pair in pool:
        inputs = pair_inputs(model, pair)
        if inputs is not None:
            picked.append(inputs)
        if len(picked) == args.n_pairs:
            break
    print(f"pairs: {len(picked)} usable of {len(pool)} looked at (the rest tokenize to different lengths)", flush=True)
    if not picked:
        raise SystemExit("no usable clean/corrupted pair: try another --seed or --pairs file")
    return picked


SPAN_HELP = ("positions to patch: 'cot' (the reasoning tokens), 'cot-last N' (its last N), 'diff' (first differing "
             "token to the end: patching a whole residual there must give the clean run), 'last N' (the last N)")


def span(inputs: PairInputs, spec: str) -> list[int]:
    """Positions to patch, from a spec (see SPAN_HELP)."""
    parts = spec.split()
    if spec == "cot":
        return list(range(inputs.cot_start, inputs.cot_end))
    if spec == "diff":
        return list(range(inputs.first_diff, inputs.n_pos))
    if len(parts) == 2 and parts[0] in ("last", "cot-last") and parts[1].isdigit():
        end = inputs.n_pos if parts[0] == "last" else inputs.cot_end
        return list(range(max(0, end - int(parts[1])), end))
    raise ValueError(f"--span {spec!r}: use 'cot', 'cot-last N', 'diff' or 'last N'")


def layer_list(model: Any, step_: int) -> list[int]:
    """Every `step_`-th layer, always including the last."""
    layers = list(range(0, model.cfg.n_layers, max(1, step_)))
    return layers if layers[-1] == model.cfg.n_layers - 1 else layers + [model.cfg.n_layers - 1]


# ---------------------------------------------------------------- output
def write_outputs(out: Path, results: dict[str, Any], summary: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print(f"wrote {out}/results.json, {out}/summary.md and the figures", flush=True)


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float):
        return None if x != x else float(f"{x:.7g}")  # NaN -> null; 7 significant digits
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    return str(x)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_header(args: argparse.Namespace, model: Any, title: str, counted: str = "pairs") -> list[str]:
    options = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items() if v is not None)
    return [f"# {title}", "",
            f"- model: `{args.model}` ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
            f"{model.dtype}, {model.device})",
            f"- {counted}: {args.n_pairs} (seed {args.seed}{', from ' + args.pairs if args.pairs else ''})",
            f"- rerun: `python examples/{title}.py {options}`", ""]
