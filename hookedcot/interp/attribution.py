"""Attribution patching: a whole layer × position patching sweep estimated to first order from one
clean forward, one corrupted forward and one backward pass.

  metric(patched) − metric(corrupted) ≈ (a_clean − a_corrupted) · ∂metric/∂a  at a_corrupted

for each site a = (hook at layer L, position p), summed over the activation's feature axes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from hookedcot.hook_names import get_act_name
from hookedcot.interp.labels import token_labels
from hookedcot.interp.patching import as_tokens, logits_at
from hookedcot.interp.positions import metric_positions as positions_read, position_axis, resolve_positions
from hookedcot.interp.renamed import renamed
from hookedcot.interp.results import Result


def patch_by_attribution(
    model: Any,
    clean: str | Tensor,
    corrupted: str | Tensor,
    metric: Callable[[Tensor], Tensor],
    hook: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Any = None,
    metric_positions: Any = (-1,),
) -> Result:
    """Estimated metric change of patching each (layer, position) of `hook`: [layer, position].
    `metric` maps logits [1, n_metric, vocab] to [1] and must be differentiable."""
    clean_t, corrupt_t = as_tokens(model, clean), as_tokens(model, corrupted)
    if clean_t.shape != corrupt_t.shape:
        raise ValueError("attribution patching by position needs clean and corrupted of equal length")
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [get_act_name(hook, layer) for layer in layers]
    n, n_pos = model.cfg.n_layers, corrupt_t.shape[1]
    pos = resolve_positions(positions, n_pos)
    metric_pos = positions_read(metric_positions, n_pos)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_t, names_filter=names)

    def make_leaf(x: Tensor, h) -> Tensor:
        return x.detach().requires_grad_(True)

    with torch.enable_grad():
        final, cache = model.run_with_cache(
            corrupt_t, names_filter=names, detach=False, fwd_hooks=[("hook_embed", make_leaf)], stop_at_layer=n
        )
        value = metric(logits_at(model, final, metric_pos)).sum()
        grads = torch.autograd.grad(value, [cache[name] for name in names])
    rows = []
    for name, grad in zip(names, grads):
        delta = (clean_cache[name] - cache[name].detach()).float()
        est = (delta * grad.float()).movedim(position_axis(name), 1).flatten(2).sum(-1)[0]  # [pos]
        rows.append(est[pos])
    return Result(
        torch.stack(rows), ("layer", "position"),
        {"layer": [str(x) for x in layers], "position": token_labels(model, corrupt_t, pos)},
        name=f"attribution_{hook}", meta={"hook": hook, "metric_positions": metric_pos},
    )


attribution_patch = renamed(patch_by_attribution, "attribution_patch")
