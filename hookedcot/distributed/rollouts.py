"""Rollouts spread over the ranks of a torchrun job: a batch of one prefix (`sample_rollouts`)
or every prefix of a CoT (`resample_steps`), with rank 0 returning what the single-process call
returns.

Work items are the batches the single-process engine (`cot.rollouts.run_prefix`) would decode: a
prefix's rollout indices 0..n-1 cut into balanced runs of at most `rows_per_batch` rows
(`cut_batches`; rows computed once, on rank 0, and kept in `out_dir/plan.json` so a resume cuts
the same way). Item j runs on rank j % world_size; a rank runs each prefix's prefill once for all
its batches of that prefix, as one process does. A rollout's tokens depend on its seed (per rollout index, never per rank)
and on the batch it was decoded in; the batches being the same, the rollouts are bit-identical
to the single-process call's (on the same device type, dtype and thread count).

Finished rollouts go to `out_dir/rank{r}/rollouts.jsonl` (a `RolloutStore` per rank: appends
from two processes never share a file). A rerun reads every rank's file, whatever the number of
ranks was, and decodes only batches with a rollout missing (a partly done batch is decoded whole,
so its shape is the original one, and only the missing rollouts are appended).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from hookedcot.cot.rollout_store import FILE_NAME, RolloutStore, _check_same, read_rollouts, trace_fingerprint
from hookedcot.cot.rollouts import (
    Rollout, Sampling, cut_batches, prefix_key, rollout_seed, rows_per_batch, run_prefix,
)
from hookedcot.cot.trace import THINK
from hookedcot.distributed.ranks import Ranks, init_ranks

if TYPE_CHECKING:
    from hookedcot.cot.importance import ResamplingResult
    from hookedcot.cot.trace import CoT
    from hookedcot.hooked import HookedCoT

PLAN = "plan.json"


def sample_rollouts(
    model: "HookedCoT", prefix_tokens: Sequence[int], n: int, *, seed: int = 0, key: int | str | None = None,
    temperature: float = 0.6, top_p: float | None = 0.95, top_k: int | None = None, max_new_tokens: int = 1024,
    stop_strings: Sequence[str] | None = None, stop_at_eos: bool = True, eos_token_id: int | Sequence[int] | None = None,
    think: tuple[str, str] | None = THINK, memory_budget: int | None = None, fwd_hooks: Iterable = (),
    out_dir: str | Path | None = None, ranks: Ranks | None = None,
) -> list[Rollout] | None:
    """`cot.rollouts.sample_rollouts(model, prefix_tokens, n, ...)` over the ranks: the same list
    on rank 0, None on the others."""
    sampling = Sampling(temperature, top_p, top_k, max_new_tokens, tuple(stop_strings or ()), stop_at_eos, eos_token_id)
    prefix = [int(t) for t in (prefix_tokens.reshape(-1).tolist() if hasattr(prefix_tokens, "reshape") else prefix_tokens)]
    key = prefix_key(prefix) if key is None else key
    header = {"trace": trace_fingerprint(prefix, [len(prefix)]), "n_tokens": len(prefix), "key": str(key),
              "seed": seed, "sampling": sampling.to_dict(), "model": _model_id(model)}
    done = rollouts_over_ranks(model, [prefix], [key], n, sampling, seed, think, memory_budget, fwd_hooks,
                               out_dir, header, ranks, tag_prefix=False)
    return None if done is None else [done[0][(None, i)] for i in range(n)]


def resample_steps(
    model: "HookedCoT", cot: "CoT", n_rollouts: int = 100, *, temperature: float = 0.6, top_p: float | None = 0.95,
    top_k: int | None = None, max_new_tokens: int = 1024, seed: int = 0, stop_strings: Sequence[str] | None = None,
    stop_at_eos: bool = True, eos_token_id: int | Sequence[int] | None = None, similarity: Any = None,
    threshold: float | None = None, smoothing: float | None = None, memory_budget: int | None = None,
    fwd_hooks: Iterable = (), out_dir: str | Path | None = None, ranks: Ranks | None = None,
) -> "ResamplingResult | None":
    """`cot.importance.resample_steps(model, cot, n_rollouts, ...)` with its rollouts sampled over
    the ranks; rank 0 measures the importances and returns the same result, the others None."""
    from hookedcot.cot.importance import SMOOTHING, THRESHOLD, measure_importance
    from hookedcot.cot.similarity import ResidualSimilarity

    if cot.embeds is not None:
        raise ValueError("resampling needs a token trace; this CoT has latent positions")
    sampling = Sampling(temperature, top_p, top_k, max_new_tokens, tuple(stop_strings or ()), stop_at_eos, eos_token_id)
    prefixes = [cot.prefix(k) for k in range(cot.n_steps + 1)]
    header = {"trace": trace_fingerprint(cot.tokens, [len(p) for p in prefixes]), "n_tokens": len(cot.tokens),
              "n_steps": cot.n_steps, "seed": seed, "sampling": sampling.to_dict(), "model": _model_id(model)}
    keys = [prefix_key(p) for p in prefixes]
    done = rollouts_over_ranks(model, prefixes, keys, n_rollouts, sampling, seed, cot.think, memory_budget,
                               fwd_hooks, out_dir, header, ranks, tag_prefix=True)
    if done is None:
        return None
    done, n_sampled = done
    rollouts = [[done[(k, i)] for i in range(n_rollouts)] for k in range(len(prefixes))]
    if similarity is None:
        r0, r1 = cot.reasoning_tokens
        similarity = ResidualSimilarity(model, reference=cot.tokens[r0:r1] or cot.tokens)
    result = measure_importance(cot, rollouts, similarity, THRESHOLD if threshold is None else threshold,
                                SMOOTHING if smoothing is None else smoothing)
    result.rollouts_path = Path(out_dir) if out_dir is not None else None  # rank{r}/rollouts.jsonl inside
    result.n_sampled = n_sampled
    return result


def rollouts_over_ranks(
    model: "HookedCoT", prefixes: list[list[int]], keys: list[Any], n: int, sampling: Sampling, seed: int,
    think: tuple[str, str] | None, memory_budget: int | None, fwd_hooks: Iterable, out_dir: str | Path | None,
    header: dict[str, Any], ranks: Ranks | None, tag_prefix: bool,
) -> tuple[dict[tuple[int | None, int], Rollout], int] | None:
    """The engine: ({(prefix k or None, index): Rollout} for n rollouts of every prefix, how many
    of them this call sampled, the rest read from `out_dir`) on rank 0, None elsewhere."""
    ranks = ranks if ranks is not None else init_ranks()
    out = Path(out_dir) if out_dir is not None else None
    rows = ranks.broadcast(_rows(model, sampling, memory_budget, out) if ranks.is_main else None)
    items = [(k, batch) for k in range(len(prefixes)) for batch in cut_batches(list(range(n)), rows)]
    have: dict[tuple[int | None, int], Rollout] = {}
    store = None
    if out is not None:
        store = RolloutStore(out / f"rank{ranks.rank}", header)
        have.update(_read_all(out, store.header))
        have.update(store.done)
    mine: dict[tuple[int | None, int], Rollout] = {}
    sampled = 0
    todo: dict[int, list[list[tuple[int, int]]]] = {}  # prefix -> this rank's batches to decode
    for j in ranks.share(len(items)):
        k, batch = items[j]
        tag = k if tag_prefix else None
        if all((tag, i) in have for i in batch):
            mine.update({(tag, i): have[(tag, i)] for i in batch})
        else:
            todo.setdefault(k, []).append([(i, rollout_seed(seed, keys[k], i)) for i in batch])
    try:
        for k, batches in todo.items():  # one prefill per prefix, as in one process
            tag = k if tag_prefix else None
            for r in run_prefix(model, prefixes[k], [], sampling, think=think, fwd_hooks=fwd_hooks, batches=batches):
                r.prefix = tag
                if (tag, r.index) in have:  # a partly done batch: keep what is on disk
                    r = have[(tag, r.index)]
                else:
                    sampled += 1
                    if store is not None:
                        store.append(r)
                mine[(tag, r.index)] = r
    finally:
        if store is not None:
            store.close()
    parts = ranks.gather((mine, sampled))
    if parts is None:
        return None
    merged = {key: r for part, _ in parts for key, r in part.items()}
    missing = [key for k in range(len(prefixes)) for key in [((k if tag_prefix else None), i) for i in range(n)]
               if key not in merged]
    if missing:
        raise RuntimeError(f"rank 0 gathered no rollout for {missing[:5]} ({len(missing)} missing)")
    return merged, sum(n for _, n in parts)


def _rows(model: "HookedCoT", sampling: Sampling, memory_budget: int | None, out: Path | None) -> int:
    """Rows a batch holds: from `out/plan.json` when resuming (the cut stays the same), else from
    the memory budget as `run_prefix` computes it (and written to the plan)."""
    plan = out / PLAN if out is not None else None
    if plan is not None and plan.exists():
        return int(json.loads(plan.read_text())["rows_per_batch"])
    rows = rows_per_batch(model, sampling.max_new_tokens, memory_budget)
    if plan is not None:
        plan.parent.mkdir(parents=True, exist_ok=True)
        tmp = plan.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows_per_batch": rows}))
        os.replace(tmp, plan)
    return rows


def _read_all(out: Path, header: dict[str, Any]) -> dict[tuple[int | None, int], Rollout]:
    """Every rollout any rank's file holds (a rerun may have a different number of ranks)."""
    have = {}
    for path in sorted(out.glob(f"rank*/{FILE_NAME}")):
        if path.stat().st_size == 0:
            continue
        old, rollouts = read_rollouts(path)
        _check_same(path, old, header)
        have.update({(r.prefix, r.index): r for r in rollouts})
    return have


def _model_id(model: "HookedCoT") -> dict[str, Any]:
    return {"name": model.cfg.model_name, "dtype": str(model.dtype).removeprefix("torch.")}
