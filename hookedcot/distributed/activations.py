"""Activation collection over the ranks of a torchrun job, into the store one process writes.

The store's plan (texts tokenized, grouped into batches of similar length) is the work: batch b
is item b, run on rank b % world_size by `dictionaries.store.batch_records` — the function the
single-process collection runs — and saved under `<out>.parts/` as it finishes (`out` must be on
a filesystem every node shares). Rank 0 then writes the store with `collect_activations(...,
records=...)`, loading the ranks' batches from disk one at a time, in plan order (memory holds a
shard's buffer, as in one process, never the collection): the same shards, the same statistics
(summed in the same order), bit for bit, and the parts folder is removed. A rerun resumes twice over: batches already in the store's shards are
not planned again, and batches saved under `.parts/` are loaded rather than recomputed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from hookedcot.dictionaries.store import (
    DTYPES, MANIFEST, ActivationStore, _batch_plan, _fingerprint, _named_models, _tokenize, batch_records,
    collect_activations as collect_here,
)
from hookedcot.distributed.ranks import Ranks, WorkFolderError, init_ranks, run_items
from hookedcot.hook_names import stop_layer


def collect_activations(
    models: Any, texts: Sequence[Any], hook_names: str | Sequence[str], out: str | Path, *, batch_size: int = 8,
    max_length: int | None = 512, shard_tokens: int = 65536, dtype: str | torch.dtype = "float32",
    skip_first: int = 1, prepend_bos: bool | None = None, ranks: Ranks | None = None,
) -> ActivationStore | None:
    """`dictionaries.store.collect_activations(models, texts, hook_names, out, ...)` with its
    batches run over the ranks: the store on rank 0, None on the others."""
    ranks = ranks if ranks is not None else init_ranks()
    named = _named_models(models)
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    for model in named.values():
        model.cache_names(names)
    storage = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    first = next(iter(named.values()))
    sequences = _tokenize(first, texts, max_length, prepend_bos)
    plan = _batch_plan(sequences, batch_size)
    fingerprint = _fingerprint(named, names, sequences, plan, storage, skip_first)
    out = Path(out)
    done = _batches_in_store(out, fingerprint)
    stop = stop_layer(names, first.cfg.n_layers)
    parts = out.with_name(out.name + ".parts")

    def compute(b: int) -> dict[str, torch.Tensor] | None:  # batches the store holds already: nothing to do
        return None if b < done else batch_records(named, sequences, plan[b], names, stop, skip_first, storage)

    description = {"work": "collect_activations", "store": fingerprint, "n_items": len(plan)}
    gathered = run_items(compute, len(plan), ranks, parts, description, in_memory=False)  # read back one at a time
    if gathered is None:
        return None
    store = collect_here(named, texts, names, out, batch_size=batch_size, max_length=max_length,
                         shard_tokens=shard_tokens, dtype=storage, skip_first=skip_first, prepend_bos=prepend_bos,
                         progress=False, records=gathered.__getitem__)
    shutil.rmtree(parts, ignore_errors=True)
    return store


def _batches_in_store(out: Path, fingerprint: str) -> int:
    """Batches the store at `out` already holds (0 for none); refuses a store of another collection."""
    path = out / MANIFEST
    if not path.exists():
        return 0
    manifest = json.loads(path.read_text())
    if manifest.get("fingerprint") != fingerprint:
        raise WorkFolderError(f"{out} holds another collection (other models, texts, hooks or settings); "
                         "choose a new folder or delete this one")
    return sum(s["batches"][1] - s["batches"][0] for s in manifest["shards"])
