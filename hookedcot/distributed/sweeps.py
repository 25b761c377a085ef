"""A patching sweep over many prompt pairs, spread over the ranks of a torchrun job.

    ranks = init_ranks()
    model = HookedCoT.from_pretrained(path, device=local_device())
    results = patch_pairs(model, pairs, patch_layer_position, out_dir="runs/patch", hook="resid_pre")
    if results is not None:  # rank 0: one Result per pair, in the pairs' order
        ...

Each pair is one work item (ranks.py): pair i runs on rank i % world_size through the same sweep
function a single process would call, so rank 0's list equals `[sweep(model, c, x, **kw) for c, x
in pairs]` bit for bit. Pass an int `batch_size` when comparing runs on machines whose free
memory differs: "auto" sizes patching batches by free memory, and batch shapes change the last
bits of a float sum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from hookedcot.distributed.ranks import Ranks, init_ranks, run_items


def patch_pairs(
    model: Any,
    pairs: Sequence[tuple[Any, Any]],
    sweep: Callable[..., Any] | None = None,
    *,
    out_dir: str | Path | None = None,
    ranks: Ranks | None = None,
    **sweep_kwargs: Any,
) -> list[Any] | None:
    """`sweep(model, clean, corrupted, **sweep_kwargs)` for every (clean, corrupted) pair (default
    sweep: `patch_layer_position`), this rank's share here, all of them on rank 0 (None on the
    others). With `out_dir` each pair's result is saved as it finishes and a rerun resumes.
    Pairs are text or token ids; a `ProblemPair` needs `format_prompt` first."""
    from hookedcot.interp.sweeps import patch_layer_position

    sweep = sweep or patch_layer_position
    ranks = ranks if ranks is not None else init_ranks()
    pairs = list(pairs)
    sweep_kwargs.setdefault("progress", False)
    description = {
        "work": "patch_pairs", "sweep": f"{sweep.__module__}.{sweep.__qualname__}", "n_items": len(pairs),
        "pairs": [[_describe(c), _describe(x)] for c, x in pairs], "options": _options(sweep_kwargs),
        "model": {"name": model.cfg.model_name, "dtype": str(model.dtype), "n_layers": model.cfg.n_layers},
    }

    def compute(i: int) -> Any:
        clean, corrupted = pairs[i]
        with torch.no_grad():
            return sweep(model, clean, corrupted, **sweep_kwargs)

    return run_items(compute, len(pairs), ranks, out_dir, description)


def _describe(x: Any) -> Any:
    """A JSON-able identity of a prompt: the text, or the token ids."""
    return x.reshape(-1).tolist() if isinstance(x, torch.Tensor) else x


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The sweep's options as a fingerprint can hold them (callables by name)."""
    return {k: getattr(v, "__qualname__", v) if callable(v) else v for k, v in sorted(kwargs.items()) if k != "progress"}
