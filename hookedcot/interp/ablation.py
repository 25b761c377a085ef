"""Ablations as hook builders: each returns a `(hook_name, hook_fn)` pair for `fwd_hooks=`.

    model.run_with_hooks(tokens, fwd_hooks=[
        ablate_zero("blocks.24.hook_mlp_out", positions="last 50"),   # an MLP's output, last 50 tokens
        ablate_neurons(24, [609]),                                    # one neuron, every position
        ablate_heads(3, [0, 5]),                                      # two heads' hook_z
    ])
    with model.hooks([ablate_mean(model, "blocks.5.hook_resid_post", dataset_prompts)]):
        model.generate(prompt, max_new_tokens=64)

What to edit: `positions` (absolute sequence indices, any form `positions.py` documents; they
work during generation because they are matched against `hook.positions`), `heads` (the hook
table's head axis: h or g) and `neurons` (the last axis: `mlp.hook_post` neurons, or any hook's
last dimension). Everything not selected is returned bit-for-bit unchanged.

- zero: the selected entries become 0.
- mean: they become the mean of the same hook over a dataset you pass (`activation_mean`):
  over every real (non-padding) token, or per absolute position (`per_position=True`).
- resample: they become another input's activation at the same absolute position; which source
  feeds which batch row is fixed by `seed`.
- direction: x − (x·v̂) v̂ on the last axis, removing the component along v.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hookedcot.hook_names import get_act_name, layer_of, spec_of
from hookedcot.interp.interventions import MeanFill, ReplaceFrom, SetValue
from hookedcot.interp.positions import PositionSpec, position_axis
from hookedcot.interp.renamed import renamed
from hookedcot.interp.steering import scale_direction

HookPair = tuple[str, Any]
Index = Sequence[int] | int | None


def ablate_zero(name: str, positions: PositionSpec = None, heads: Index = None, neurons: Index = None) -> HookPair:
    """Set the selected entries of hook `name` to zero (a `SetValue` intervention: declarative)."""
    return name, SetValue(0.0, positions, heads, neurons)


def ablate_neurons(layer: int, neurons: Sequence[int] | int, positions: PositionSpec = None, value: float = 0.0) -> HookPair:
    """Set MLP neurons (`blocks.{layer}.mlp.hook_post[..., n]`, the input of down_proj) to `value`
    (0: the same as zeroing those columns of down_proj)."""
    return get_act_name("post", layer), SetValue(value, positions, None, neurons)


def ablate_heads(layer: int, heads: Sequence[int] | int, positions: PositionSpec = None, hook: str = "z") -> HookPair:
    """Zero attention heads in `blocks.{layer}.attn.hook_{hook}` (hook_z by default: the head's
    output before o_proj, i.e. removing the head's contribution to the residual)."""
    return ablate_zero(get_act_name(hook, layer), positions=positions, heads=heads)


def ablate_direction(name: str, v: Float[Tensor, " d"], positions: PositionSpec = None) -> HookPair:
    """Project direction `v` out of the last axis of hook `name`: x − (x·v̂) v̂ (v̂ = v/‖v‖),
    computed in float32; the result is orthogonal to v up to the activation dtype's rounding.
    It is `scale_direction` with factor 0, the same arithmetic."""
    return scale_direction(name, v, 0.0, positions)


# ---------------------------------------------------------------- dataset statistics
@torch.no_grad()
def _dataset_activations(
    model: Any, name: str, dataset: Any, attention_mask: Tensor | None, batch_size: int
):
    """Yield (activation [b, p, ...] float32, mask [b, p] bool) for hook `name` over `dataset`
    (a list of strings, or token ids [n, pos] with an optional attention mask), batch by batch."""
    if position_axis(name) != 1:
        raise ValueError(f"{name} has no position axis at dim 1 (shape {spec_of(name).shape}); ablate_mean and "
                         "ablate_resample work on [batch, pos, ...] hooks")
    if isinstance(dataset, str):
        dataset = [dataset]
    if isinstance(dataset, (list, tuple)):
        tokens, attention_mask = model.tokenize(list(dataset))
    else:
        tokens = dataset[None] if dataset.dim() == 1 else dataset
    tokens = tokens.to(model.device)
    mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.to(tokens.device).bool()
    layer = layer_of(name)  # stop after the hook's block: later layers cannot change it
    stop = 0 if name == "hook_embed" else (layer + 1 if layer is not None and layer + 1 < model.cfg.n_layers else None)
    for i in range(0, tokens.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        m = mask[rows]
        _, cache = model.run_with_cache(tokens[rows], attention_mask=None if bool(m.all()) else m.long(),
                                        names_filter=name, stop_at_layer=stop)
        yield cache[name].float(), m


def activation_mean(
    model: Any, name: str, dataset: Any, per_position: bool = False, attention_mask: Tensor | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Mean of hook `name` over a dataset's real (non-padding) tokens, in float32.

    `per_position=False`: one mean over every token, shaped like one position ([d], [h, k], ...).
    `per_position=True`: [pos, ...], the mean over rows at each absolute position (positions where
    no row has a real token hold the overall mean) — meaningful when the dataset's sequences are
    aligned (same template, same length)."""
    overall, by_pos = _means(model, name, dataset, attention_mask, batch_size)
    return by_pos if per_position else overall


def _means(model: Any, name: str, dataset: Any, attention_mask: Tensor | None, batch_size: int) -> tuple[Tensor, Tensor]:
    """(overall mean [...], per-position mean [pos, ...]) in one pass over the dataset."""
    pos_total = pos_count = None
    for act, m in _dataset_activations(model, name, dataset, attention_mask, batch_size):
        w = m.reshape(*m.shape, *([1] * (act.dim() - 2))).float()
        ps, pc = (act * w).sum(0), w.sum(0)  # [pos, ...], [pos, 1...]
        pos_total, pos_count = (ps, pc) if pos_total is None else (pos_total + ps, pos_count + pc)
    if pos_total is None or float(pos_count.sum()) == 0:
        raise ValueError("the dataset has no real tokens to average over")
    overall = pos_total.sum(0) / pos_count.sum(0)
    return overall, torch.where(pos_count > 0, pos_total / pos_count.clamp(min=1), overall)


def ablate_mean(
    model: Any, name: str, dataset: Any = None, per_position: bool = False, positions: PositionSpec = None,
    heads: Index = None, neurons: Index = None, attention_mask: Tensor | None = None, batch_size: int = 32,
    mean: Tensor | None = None,
) -> HookPair:
    """Replace the selected entries of hook `name` by their mean over `dataset` (see
    `activation_mean`; or pass a precomputed `mean=`, [...] or with `per_position` [pos, ...]).
    With `per_position=True`, positions past the dataset's length get the overall mean."""
    if mean is None:
        if dataset is None:
            raise ValueError("ablate_mean needs a dataset (strings or token ids) or a precomputed mean=")
        overall, by_pos = _means(model, name, dataset, attention_mask, batch_size)
        mean = by_pos if per_position else overall
    else:
        mean = mean.float()
        overall = mean.mean(0) if per_position else mean
    return name, MeanFill(mean, per_position, positions, heads, neurons, overall=overall)


@torch.no_grad()
def ablate_resample(
    model: Any, name: str, sources: Any, seed: int = 0, positions: PositionSpec = None, heads: Index = None,
    neurons: Index = None, attention_mask: Tensor | None = None,
) -> HookPair:
    """Replace the selected entries of hook `name` by other inputs' activations (`sources`: strings
    or token ids [n, pos]) at the same absolute positions. Batch row i takes source
    `perm[i % n]`, `perm` a permutation drawn once from `seed`: deterministic, and the same source
    for a row throughout generation. Sources must reach every position they replace; with
    left-padded sources of different lengths, absolute positions point at different tokens —
    use equal-length sources."""
    acts = torch.cat([a for a, _ in _dataset_activations(model, name, sources, attention_mask, batch_size=32)])
    perm = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))
    return name, ReplaceFrom(acts, rows=perm, positions=positions, heads=heads, units=neurons)


zero_ablation = renamed(ablate_zero, "zero_ablation")
mean_ablation = renamed(ablate_mean, "mean_ablation")
resample_ablation = renamed(ablate_resample, "resample_ablation")
neuron_ablation = renamed(ablate_neurons, "neuron_ablation")
head_ablation = renamed(ablate_heads, "head_ablation")
direction_ablation = renamed(ablate_direction, "direction_ablation")
