"""The sweeps researchers call: each layer, each (layer, position), each head, each component
patched alone, as labelled `Result`s (one per metric when given several by name); and the naive
one-forward-per-site loop they are benchmarked against. The sweeps are thin callers of the engine
in `patching.py`; the naive loop shares no code with it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.hook_names import get_act_name
from hookedcot.interp.labels import token_labels
from hookedcot.interp.patching import (
    Metrics, PatchRuns, Site, as_tokens, kl_metric, metrics_by_name, per_metric, prepare_runs, run_sites,
    shaped_like,
)
from hookedcot.interp.positions import Selection, head_axis, metric_positions as positions_read, resolve_positions
from hookedcot.interp.renamed import renamed, renamed_constants
from hookedcot.interp.results import Result


def _setup(model: Any, clean: Any, corrupted: Any, hook: str, layers: Sequence[int] | None, runs: PatchRuns | None,
           metric: Metrics | None, metric_positions: Any) -> tuple[list[int], list[str], PatchRuns, Metrics]:
    """What every sweep starts with: its layers, their hook names, the two runs and the metric."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [get_act_name(hook, layer) for layer in layers]
    runs = runs.ensure(names) if runs is not None else prepare_runs(model, clean, corrupted, names)
    return layers, names, runs, metric or kl_metric(runs, metric_positions)


def labelled(values: Tensor | Mapping[str, Tensor], build: Callable[[Tensor, str | None], Result]) -> Result | dict[str, Result]:
    """`build(values, None)` for one metric; {name: build(values[name], name)} for several."""
    if isinstance(values, Mapping):
        return {k: build(v, k) for k, v in values.items()}
    return build(values, None)


def _named(base: str, metric_name: str | None) -> str:
    return base if metric_name is None else f"{base}_{metric_name}"


def _ticks(model: Any, runs: PatchRuns, positions: Sequence[int]) -> list[str]:
    return token_labels(model, runs.label_tokens, positions)



def patch_layer_position(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, metric: Metrics | None = None,
    hook: str = "resid_pre", layers: Sequence[int] | None = None, positions: Any = None,
    metric_positions: Any = (-1,), batch_size: int | str = "auto", progress: bool = True,
    runs: PatchRuns | None = None,
) -> Result | dict[str, Result]:
    """Each (layer, position) patched alone: [layer, position] metric values."""
    layers, names, runs, metric = _setup(model, clean, corrupted, hook, layers, runs, metric, metric_positions)
    pos = resolve_positions(positions, runs.n_pos)
    sites = [Site(name, (p,)) for name in names for p in pos]
    values = per_metric(run_sites(runs, sites, metric, metric_positions, batch_size, progress), lambda v: v.view(len(layers), len(pos)))
    labels = {"layer": [str(x) for x in layers], "position": _ticks(model, runs, pos)}
    meta = {"hook": hook, "metric_positions": runs.metric_positions(metric_positions)}
    return labelled(values, lambda v, m: Result(v, ("layer", "position"), labels, name=_named(f"patch_{hook}_layer_position", m),
                                                 meta={**meta, "metric": m}))


def patch_layers(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, metric: Metrics | None = None,
    hook: str = "resid_pre", layers: Sequence[int] | None = None, positions: Any = None,
    metric_positions: Any = (-1,), batch_size: int | str = "auto", progress: bool = True,
    runs: PatchRuns | None = None,
) -> Result | dict[str, Result]:
    """Each layer patched at all `positions` at once (a span, e.g. the CoT tokens): [layer]."""
    layers, names, runs, metric = _setup(model, clean, corrupted, hook, layers, runs, metric, metric_positions)
    pos = tuple(resolve_positions(positions, runs.n_pos))
    values = run_sites(runs, [Site(n, pos) for n in names], metric, metric_positions, batch_size, progress)
    meta = {"hook": hook, "positions": list(pos), "metric_positions": runs.metric_positions(metric_positions)}
    return labelled(values, lambda v, m: Result(v, ("layer",), {"layer": [str(x) for x in layers]},
                                                 name=_named(f"patch_{hook}_layers", m), meta={**meta, "metric": m}))


def patch_heads(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, metric: Metrics | None = None,
    hook: str = "z", layers: Sequence[int] | None = None, positions: Any = None,
    metric_positions: Any = (-1,), batch_size: int | str = "auto", progress: bool = True,
    runs: PatchRuns | None = None,
) -> Result | dict[str, Result]:
    """Each (layer, head) patched alone over `positions`: [layer, head]. `hook` is a per-head hook
    (z, q, k, v, pattern; k/v index key/value heads)."""
    layers, names, runs, metric = _setup(model, clean, corrupted, hook, layers, runs, metric, metric_positions)
    axis = head_axis(names[0])
    if axis is None:
        raise ValueError(f"patch_heads needs a per-head hook (z, q, k, v, rot_q, rot_k, result, pattern, attn_scores); got {hook!r}")
    n_heads = runs.clean_acts[names[0]].shape[axis]
    pos = None if positions is None else tuple(resolve_positions(positions, runs.n_pos))
    sites = [Site(n, pos, heads=(h,)) for n in names for h in range(n_heads)]
    values = per_metric(run_sites(runs, sites, metric, metric_positions, batch_size, progress), lambda v: v.view(len(layers), n_heads))
    meta = {"hook": hook, "positions": None if pos is None else list(pos),
            "metric_positions": runs.metric_positions(metric_positions)}
    return labelled(values, lambda v, m: Result(v, ("layer", "head"), {"layer": [str(x) for x in layers]},
                                                 name=_named(f"patch_{hook}_heads", m), meta={**meta, "metric": m}))


PATCH_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def patch_components(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, metric: Metrics | None = None,
    components: Sequence[str] = PATCH_COMPONENTS, layers: Sequence[int] | None = None, positions: Any = None,
    per_position: bool = False, metric_positions: Any = (-1,), batch_size: int | str = "auto",
    progress: bool = True,
) -> Result | dict[str, Result]:
    """Each component × layer (× position) patched alone: [component, layer(, position)].
    "z" patches all heads of hook_z at once."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [get_act_name(c, layer) for c in components for layer in layers]
    runs = prepare_runs(model, clean, corrupted, names)
    metric = metric or kl_metric(runs, metric_positions)
    pos = resolve_positions(positions, runs.n_pos)
    if per_position:
        sites = [Site(n, (p,)) for n in names for p in pos]
        shape, axes = (len(components), len(layers), len(pos)), ("component", "layer", "position")
    else:
        sites = [Site(n, tuple(pos)) for n in names]
        shape, axes = (len(components), len(layers)), ("component", "layer")
    values = per_metric(run_sites(runs, sites, metric, metric_positions, batch_size, progress), lambda v: v.view(*shape))
    labels = {"component": list(components), "layer": [str(x) for x in layers]}
    if per_position:
        labels["position"] = _ticks(model, runs, pos)
    meta = {"positions": pos, "metric_positions": runs.metric_positions(metric_positions)}
    return labelled(values, lambda v, m: Result(v, axes, labels, name=_named("patch_components", m), meta={**meta, "metric": m}))


@torch.no_grad()
def patch_naively(
    model: Any, clean: str | Tensor, corrupted: str | Tensor, sites: Sequence[Site], metric: Metrics,
    metric_positions: Any = (-1,), target_hooks: Sequence = (), progress: bool = False,
) -> Tensor | dict[str, Tensor]:
    """The slow obvious way — one full hooked forward per site, written with `torch.where` over
    the site's `Selection` rather than the engine's indexing — for benchmarks and tests."""
    clean_t, corrupt_t = as_tokens(model, clean), as_tokens(model, corrupted)
    metrics = metrics_by_name(metric)
    metric_pos = positions_read(metric_positions, corrupt_t.shape[1])
    _, cache = model.run_with_cache(clean_t, names_filter=sorted({s.hook for s in sites}))
    out: dict[str, list[Tensor]] = {k: [] for k in metrics}
    for site in tqdm(sites, disable=not progress, desc="naive patching", leave=False):
        logits = model.run_with_hooks(corrupt_t, fwd_hooks=list(target_hooks) + [(site.hook, _write(site, cache[site.hook]))])
        for k, fn in metrics.items():
            out[k].append(fn(logits[:, metric_pos])[0])
    return shaped_like(metric, {k: torch.stack(v).float().cpu() for k, v in out.items()})


def _write(site: Site, clean: Tensor):
    select = Selection(list(site.positions) if site.positions is not None else None, site.heads, site.neurons)

    def hook(x: Tensor, h) -> Tensor:
        mask = select.mask(x, h)
        return clean.clone() if mask is None else torch.where(mask, clean, x)

    return hook


naive_patch_loop = renamed(patch_naively, "naive_patch_loop")


__getattr__ = renamed_constants(__name__, {"COMPONENTS": ("PATCH_COMPONENTS", PATCH_COMPONENTS)})
