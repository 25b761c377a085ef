"""Causal tracing: corrupt the input with seeded Gaussian noise, then restore clean activations
one (layer, position) at a time and measure how much of the clean answer comes back."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from hookedcot.hook_names import get_act_name
from hookedcot.interp.corruption import add_noise
from hookedcot.interp.labels import token_labels
from hookedcot.interp.patching import Metrics, Site, as_tokens, prepare_runs, run_sites
from hookedcot.interp.positions import resolve_positions
from hookedcot.interp.renamed import renamed
from hookedcot.interp.results import Result
from hookedcot.interp.sweeps import labelled


def trace_restoration(
    model: Any,
    prompt: str | Tensor,
    noise_positions: Any,
    sigma: float = 3.0,
    relative_to_embedding_std: bool = True,
    metric: Metrics | None = None,
    hook: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Any = None,
    metric_positions: Any = (-1,),
    seed: int = 0,
    batch_size: int | str = "auto",
    progress: bool = True,
) -> Result | dict[str, Result]:
    """Noise the embeddings at `noise_positions` (seeded, see corruption.add_noise; σ in units
    of std(W_E) by default, ROME's convention is 3), then restore each (layer, position) of `hook`
    from the clean run. Default metric: the clean top-1 token's probability at the last metric
    position, reported as normalized recovery (restored − noisy) / (clean − noisy). Several
    metrics by name give one Result each, from the same forwards."""
    tokens = as_tokens(model, prompt)
    n_pos = tokens.shape[1]
    noised = resolve_positions(noise_positions, n_pos)
    noise = add_noise("hook_embed", sigma, noised, seed, relative_to_embedding_std, model)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [get_act_name(hook, layer) for layer in layers]
    runs = prepare_runs(model, tokens, tokens, names, target_hooks=[noise])
    pos = resolve_positions(positions, n_pos)
    clean_logits = runs.logits("clean", metric_positions)
    noisy_logits = runs.logits("corrupted", metric_positions)
    answer = clean_logits[0, -1].argmax()
    if metric is None:
        clean_p = clean_logits[0, -1].float().softmax(-1)[answer]
        noisy_p = noisy_logits[0, -1].float().softmax(-1)[answer]

        def metric(logits: Tensor) -> Tensor:
            p = logits[:, -1].float().softmax(-1)[:, answer]
            return (p - noisy_p) / (clean_p - noisy_p)

    sites = [Site(n, (p,)) for n in names for p in pos]
    values = run_sites(runs, sites, metric, metric_positions, batch_size, progress)
    labels = {"layer": [str(x) for x in layers], "position": token_labels(model, tokens, pos)}
    meta = {"sigma": sigma, "relative_to_embedding_std": relative_to_embedding_std, "noise_positions": noised,
            "answer_token": int(answer), "seed": seed}
    return labelled(values, lambda v, m: Result(
        v.view(len(layers), len(pos)), ("layer", "position"), labels,
        name=f"restore_{hook}" if m is None else f"restore_{hook}_{m}", meta={**meta, "metric": m}))


restoration_sweep = renamed(trace_restoration, "restoration_sweep")
