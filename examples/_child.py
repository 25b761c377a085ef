"""A chain-of-thought "child" of a base model, for diffing the two (seed 003).

`make_child(base, cache_dir)` fine-tunes a copy of the base on generated step-by-step arithmetic
word problems (`hookedcot.interp.data`): the chat template with the question as the user turn,
then the problem's reference reasoning ("... The answer is N.") and the end-of-turn token as the
assistant's reply, the loss on the assistant's tokens only. Only the MLPs of blocks
`train_layers` are trained (by default 0..12, so activations at and below the middle layer the
crosscoder reads change), and only they are saved: `child.safetensors` plus `fingerprint.json`
(base, its trained tensors' digest, every setting, a format marker) in `cache_dir/<hash of the
fingerprint>/`. A second call with the same settings loads them into a fresh base instead of
training; the fingerprint is written last and each file is renamed into place, so an interrupted
run leaves no cache that looks valid.

Questions are split between training and evaluation by a hash of their text, so
`held_out_problems` never returns a question `make_child` trains on (nor its corrupted twin),
whatever the seeds.

    child = make_child("smollm2-135m-instruct", "hookedcot_out/children")
    child.child_info  # {"from_cache": ..., "seconds": ..., "losses": [...], "folder": ..., "fingerprint": ...}
    problems = held_out_problems(32)  # [(question, answer)] for dictionaries.evaluation.evaluate_accuracy

The defaults, measured on 2 CPU cores: 30 AdamW steps of 8 problems (lr 3e-4, warm-up then cosine)
take about 2 minutes (3.7 s a step; a cached child loads in about 1.5 s) and bring the reply loss
from 1.3 to about 0.12 nats a token. Greedy, 64 new tokens, batches of 8 (about 18 s a model for 32
problems, 25 s for 48): the child answers 6 / 32 and 8 / 48 held-out problems correctly (seed 1:
7 / 32, 12 / 48), the base 0 / 32 and 0 / 48 — and still 0 / 32 given 256 new tokens. The child
writes the short reasoning and "The answer is N."; both slip on the arithmetic itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

import hookedcot
from hookedcot import HookedCoT
from hookedcot.interp.data import Problem, generate_pairs

FORMAT = "hookedcot-child/1"
DEFAULT_LAYERS = tuple(range(13))
HELD_OUT_EVERY = 4  # one question in four (by hash) is held out, the rest may be trained on


# ---------------------------------------------------------------- problems
def _held_out(question: str) -> bool:
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def _problems(n: int, seed: int, held_out: bool) -> list[Problem]:
    """`n` distinct problems on one side of the split, deterministic. A pair goes to the side of its
    clean question; held-out problems are clean ones only, training ones clean and corrupted whose
    own question is on the training side too — so no held-out question, nor the corrupted twin of
    one, is ever trained on."""
    seen: set[str] = set()
    out: list[Problem] = []
    chunk = 0
    while len(out) < n:
        for pair in generate_pairs(64, seed=seed * 1000 + chunk):
            if _held_out(pair.clean.question) != held_out:
                continue
            for p in (pair.clean,) if held_out else (pair.clean, pair.corrupted):
                if len(out) < n and p.question not in seen and _held_out(p.question) == held_out:
                    seen.add(p.question)
                    out.append(p)
        chunk += 1
    return out


def training_problems(n: int, seed: int = 0) -> list[Problem]:
    return _problems(n, seed, held_out=False)


def held_out_problems(n: int, seed: int = 12345) -> list[tuple[str, str]]:
    """[(question, answer)] for evaluation: never a question `make_child` trains on."""
    return [(p.question, str(p.answer)) for p in _problems(n, seed, held_out=True)]


# ---------------------------------------------------------------- data
def encode(model: HookedCoT, problem: Problem) -> tuple[list[int], int]:
    """(token ids of chat prompt + reasoning + end of turn, where the reply starts)."""
    tok = model.tokenizer
    prompt = model.apply_chat_template([{"role": "user", "content": problem.question}])
    prompt_ids = tok.tokenize(prompt)[0][0].tolist()
    reply_ids = tok.tokenize(problem.reasoning, prepend_bos=False)[0][0].tolist()
    eos = list(getattr(tok, "eos_token_ids", []) or [])[:1]
    return prompt_ids + reply_ids + eos, len(prompt_ids)


def batch(rows: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (tokens, attention mask, target mask) [batch, pos]; target_mask[b, i] says
    whether token i is a reply token the loss scores."""
    n = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    target = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (ids, start) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        target[i, start : len(ids)] = True
    return tokens, mask, target


def reply_loss(model: HookedCoT, tokens: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the reply tokens."""
    logits = model(tokens, attention_mask=mask, return_type="logits")
    scored = target[:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored])


# ---------------------------------------------------------------- training
def trained_parameters(model: HookedCoT, layers: Sequence[int]) -> dict[str, torch.nn.Parameter]:
    """The parameters the fine-tune changes: the MLP weights of `layers`."""
    names = {f"blocks.{layer}.mlp." for layer in layers}
    return {n: p for n, p in model.named_parameters() if any(n.startswith(prefix) for prefix in names)}


def train(
    model: HookedCoT,
    problems: Sequence[Problem],
    params: dict[str, torch.nn.Parameter],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> list[float]:
    """Fine-tune `params` of `model` in place (AdamW, linear warm-up then cosine decay); the loss per step."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    rows = [encode(model, p) for p in problems]
    pad_id = int(getattr(model.tokenizer, "pad_token_id", None) or 0)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            if len(order) < batch_size:
                order += rng.sample(range(len(rows)), len(rows))
            chosen, order = order[:batch_size], order[batch_size:]
            loss = reply_loss(model, *batch([rows[i] for i in chosen], pad_id))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach().item())
            if progress and (step % 10 == 0 or step == steps - 1):
                seconds = time.perf_counter() - t0
                print(f"  child step {step + 1}/{steps}: loss {losses[-1]:.3f} ({seconds:.0f} s)", flush=True)
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return losses


# ---------------------------------------------------------------- cache
def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_cached(folder: Path, fingerprint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The cached tensors if `folder` holds a complete cache for exactly this fingerprint."""
    try:
        if json.loads((folder / "fingerprint.json").read_text()) != fingerprint:
            return None
        return load_file(folder / "child.safetensors")
    except (OSError, ValueError):
        return None


def _base(base: str | HookedCoT) -> HookedCoT:
    """A private copy of the base to change."""
    return HookedCoT.from_pretrained(base) if isinstance(base, (str, Path)) else copy.deepcopy(base)


def make_child(
    base_name_or_model: str | HookedCoT,
    cache_dir: str | Path,
    *,
    steps: int = 30,
    seed: int = 0,
    n_train: int = 480,
    lr: float = 3e-4,
    train_layers: Sequence[int] = DEFAULT_LAYERS,
    batch_size: int = 8,
    progress: bool = True,
) -> HookedCoT:
    """The base fine-tuned on step-by-step arithmetic (see the module docstring), from
    `cache_dir` when it was made before with the same settings. `child.child_info` says which."""
    t0 = time.perf_counter()
    child = _base(base_name_or_model)
    params = trained_parameters(child, train_layers)
    if not params:
        raise ValueError(f"train_layers={list(train_layers)} selects no block of this "
                         f"{child.cfg.n_layers}-layer model; give layer indices 0..{child.cfg.n_layers - 1}")
    base_name = str(base_name_or_model) if isinstance(base_name_or_model, (str, Path)) else child.cfg.model_name
    fingerprint = {
        "format": FORMAT, "hookedcot": hookedcot.__version__, "base": base_name, "base_digest": _digest(params),
        "steps": steps, "seed": seed, "n_train": n_train, "lr": lr, "batch_size": batch_size,
        "train_layers": sorted(int(layer) for layer in train_layers), "trained": "mlp",
    }
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / key
    cached = load_cached(folder, fingerprint)
    if cached is not None and set(cached) == set(params):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(cached[name])
        losses, from_cache = [], True
    else:
        losses = train(child, training_problems(n_train, seed), params, steps=steps, lr=lr,
                       batch_size=batch_size, seed=seed, progress=progress)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "fingerprint.json").unlink(missing_ok=True)  # whatever was here is no longer vouched for
        tensors = {n: p.detach().contiguous() for n, p in params.items()}
        _write_atomic(folder / "child.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        _write_atomic(folder / "fingerprint.json", lambda tmp: tmp.write_text(json.dumps(fingerprint, indent=1)))
        from_cache = False
    child.eval()
    child.child_info = {"from_cache": from_cache, "seconds": time.perf_counter() - t0, "losses": losses,
                        "folder": str(folder), "fingerprint": fingerprint}
    if progress:
        print(f"  child {'loaded from' if from_cache else 'trained and saved to'} {folder} "
              f"({child.child_info['seconds']:.1f} s)", flush=True)
    return child
