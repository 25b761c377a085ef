"""The sweeps researchers call (seeds 001, 002, 004): each layer, each (layer, position), each head,
each component patched alone, as labelled `Result`s; and the naive one-forward-per-site loop they
are tested and benchmarked against. All of them are thin callers of the engine in `patching.py`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.hook_names import get_act_name, spec_of
from hookedcot.interp.patching import (
    Metric, PatchRuns, Site, _label_tokens, _patch_hook, _resolve_positions, as_tokens, kl_metric, prepare_runs,
    run_sites,
)
from hookedcot.interp.results import Result


def _setup(model: Any, clean: Any, corrupted: Any, hook: str, layers: Sequence[int] | None, runs: PatchRuns | None,
           metric: Metric | None, metric_positions: Sequence[int]) -> tuple[list[int], list[str], PatchRuns, Metric]:
    """What every sweep starts with: its layers, their hook names, the two runs and the metric."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [get_act_name(hook, layer) for layer in layers]
    runs = runs.ensure(names) if runs is not None else prepare_runs(model, clean, corrupted, names)
    return layers, names, runs, metric or kl_metric(runs, metric_positions)


def patch_layer_position(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, metric: Metric | None = None,
    hook: str = "resid_pre", layers: Sequence[int] | None = None, positions: Any = None,
    metric_positions: Sequence[int] = (-1,), batch_size: int | str = "auto", progress: bool = True,
    runs: PatchRuns | None = None,
) -> Result:
    """Each (layer, position) patched alone: [layer, position] metric values (seed 002)."""
    layers, names, runs, metric = _setup(model, clean, corrupted, hook, layers, runs, metric, metric_positions)
    pos = _resolve_positions(runs.n_pos, positions)
    sites = [Site(name, (p,)) for name in names for p in pos]
    values = run_sites(runs, sites, metric, metric_positions, batch_size, progress).view(len(layers), len(pos))
    ticks = _label_tokens(model, runs.corrupted_tokens)
    return Result(values, ("layer", "position"), {"layer": [str(x) for x in layers], "position": [ticks[p] for p in pos]},
                  name=f"patch_{hook}_layer_position", meta={"hook": hook, "metric_positions": list(metric_positions)})


def patch_layers(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, metric: Metric | None = None,
    hook: str = "resid_pre", layers: Sequence[int] | None = None, positions: Any = None,
    metric_positions: Sequence[int] = (-1,), batch_size: int | str = "auto", progress: bool = True,
    runs: PatchRuns | None = None,
) -> Result:
    """Each layer patched at all `positions` at once (a span, e.g. the CoT tokens): [layer] (seed 001)."""
    layers, names, runs, metric = _setup(model, clean, corrupted, hook, layers, runs, metric, metric_positions)
    pos = tuple(_resolve_positions(runs.n_pos, positions))
    values = run_sites(runs, [Site(n, pos) for n in names], metric, metric_positions, batch_size, progress)
    return Result(values, ("layer",), {"layer": [str(x) for x in layers]}, name=f"patch_{hook}_layers",
                  meta={"hook": hook, "positions": list(pos), "metric_positions": list(metric_positions)})


def patch_heads(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, metric: Metric | None = None,
    hook: str = "z", layers: Sequence[int] | None = None, positions: Any = None,
    metric_positions: Sequence[int] = (-1,), batch_size: int | str = "auto", progress: bool = True,
    runs: PatchRuns | None = None,
) -> Result:
    """Each (layer, head) patched alone over `positions`: [layer, head]. `hook` is a per-head hook
    (z, q, k, v, pattern; k/v index key/value heads)."""
    layers, names, runs, metric = _setup(model, clean, corrupted, hook, layers, runs, metric, metric_positions)
    n_heads = runs.clean_acts[names[0]].shape[1 if spec_of(names[0]).name == "hook_pattern" else 2]
    pos = None if positions is None else tuple(_resolve_positions(runs.n_pos, positions))
    sites = [Site(n, pos, heads=(h,)) for n in names for h in range(n_heads)]
    values = run_sites(runs, sites, metric, metric_positions, batch_size, progress).view(len(layers), n_heads)
    return Result(values, ("layer", "head"), {"layer": [str(x) for x in layers]}, name=f"patch_{hook}_heads",
                  meta={"hook": hook, "positions": None if pos is None else list(pos)})


COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def patch_components(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, metric: Metric | None = None,
    components: Sequence[str] = COMPONENTS, layers: Sequence[int] | None = None, positions: Any = None,
    per_position: bool = False, metric_positions: Sequence[int] = (-1,), batch_size: int | str = "auto",
    progress: bool = True,
) -> Result:
    """Each component × layer (× position) patched alone: [component, layer(, position)].
    "z" patches all heads of hook_z at once."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [get_act_name(c, layer) for c in components for layer in layers]
    runs = prepare_runs(model, clean, corrupted, names)
    metric = metric or kl_metric(runs, metric_positions)
    pos = _resolve_positions(runs.n_pos, positions)
    if per_position:
        sites = [Site(n, (p,)) for n in names for p in pos]
        shape, axes = (len(components), len(layers), len(pos)), ("component", "layer", "position")
    else:
        sites = [Site(n, tuple(pos)) for n in names]
        shape, axes = (len(components), len(layers)), ("component", "layer")
    values = run_sites(runs, sites, metric, metric_positions, batch_size, progress).view(*shape)
    labels = {"component": list(components), "layer": [str(x) for x in layers]}
    if per_position:
        ticks = _label_tokens(model, runs.corrupted_tokens)
        labels["position"] = [ticks[p] for p in pos]
    return Result(values, axes, labels, name="patch_components", meta={"positions": pos})


@torch.no_grad()
def naive_patch_loop(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, sites: Sequence[Site], metric: Metric,
    metric_positions: Sequence[int] = (-1,), target_hooks: Sequence = (), progress: bool = False,
) -> Tensor:
    """The slow obvious way — one full hooked forward per site — for tests and benchmarks."""
    clean_t, corrupt_t = as_tokens(model, clean), as_tokens(model, corrupted)
    _, cache = model.run_with_cache(clean_t, names_filter=sorted({s.hook for s in sites}))
    out = []
    for site in tqdm(sites, disable=not progress, desc="naive patching", leave=False):
        hook = _patch_hook([(0, site)], cache[site.hook])
        logits = model.run_with_hooks(corrupt_t, fwd_hooks=list(target_hooks) + [(site.hook, hook)])
        out.append(metric(logits[:, list(metric_positions)])[0])
    return torch.stack(out).float().cpu()
