"""TransformerLens' `patching` module, same names, arguments and result shapes, on hookedcot's engine.

    from hookedcot import tl_patching as patching      # was: from transformer_lens import patching
    _, clean_cache = model.run_with_cache(clean_tokens)
    results = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)  # [n_layers, pos]

Each function patches one activation of the clean run into the corrupted run at a time and returns
`patching_metric(patched_logits)` per patch, where the metric sees the logits of the whole prompt
([batch, pos, d_vocab]) exactly as in TransformerLens. What differs is how the work is done: for a
single corrupted prompt ([1, pos] or [pos]) the patches run in batches on `hookedcot.interp.patching`
(each row one patch, computed from the block and the position it patches on), not as one forward
per patch. A batch of
several corrupted prompts runs TransformerLens' loop, one forward per patch, because the metric
reduces over that batch.

| function | patches | returns |
|---|---|---|
| `get_act_patch_resid_pre` / `_resid_mid` / `_attn_out` / `_mlp_out` | one (layer, position) | [n_layers, pos] |
| `get_act_patch_attn_head_{out,q,k,v}_by_pos` | one (layer, position, head) | [n_layers, pos, heads] |
| `get_act_patch_attn_head_{out,q,k,v,pattern}_all_pos` | one (layer, head), every position | [n_layers, heads] |
| `get_act_patch_attn_head_pattern_by_pos` | one (layer, head, destination position) | [n_layers, n_heads, pos] |
| `get_act_patch_block_every` | resid_pre, attn_out, mlp_out stacked | [3, n_layers, pos] |
| `get_act_patch_attn_head_all_pos_every` | out, q, k, v, pattern stacked | [5, n_layers, n_heads] |
| `get_act_patch_attn_head_by_pos_every` | out, q, k, v, pattern stacked | [5, n_layers, pos, n_heads] |
| `get_act_patch_attn_head_pattern_dest_src_pos` | one (layer, head, dest, src) entry of the pattern | [n_layers, n_heads, pos, pos] |
| `generic_activation_patch` | whatever a `patch_setter` writes, per index | one axis per index name |

The last two run TransformerLens' loop (one forward per patch): an arbitrary setter, or a single
pattern entry, is not a site the engine knows.

"out" patches `hook_z` (as TL does); k and v index the key/value heads (n_key_value_heads of them
under GQA; the `_every` stacks pad them with zeros to n_heads, as TL does). The clean cache must
hold the patched hooks: `model.run_with_cache(clean_tokens)` with no `names_filter` holds them all.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.hook_names import get_act_name
from hookedcot.interp.patching import PatchRuns, Site, run_sites
from hookedcot.interp.positions import head_axis, position_axis
from hookedcot.kv_cache import KVCache

PatchingMetric = Callable[[Float[Tensor, "batch pos d_vocab"]], Union[Tensor, float]]


# ------------------------------------------------------------------------- the engine underneath


def _patch(model: Any, corrupted_tokens: Tensor, clean_cache: Any, metric: PatchingMetric,
           sites: Sequence[Site]) -> Float[Tensor, " n_sites"]:
    """The metric per site, each site alone patched from `clean_cache` into the corrupted run."""
    tokens = corrupted_tokens.to(model.device)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    names = list(dict.fromkeys(s.hook for s in sites))
    clean = {name: _clean_activation(clean_cache, name, tokens) for name in names}
    if tokens.shape[0] == 1:
        values = _batched(_runs(model, tokens, clean), sites, metric)
    else:
        values = _one_forward_per_site(model, tokens, clean, metric, sites)
    return values.to(model.device)


def _clean_activation(clean_cache: Any, name: str, tokens: Tensor) -> Tensor:
    try:
        act = clean_cache[name]
    except KeyError:
        raise KeyError(f"the clean cache has no {name!r}: run model.run_with_cache(clean_tokens) without a "
                       "names_filter (or with one that keeps this hook) and pass that cache") from None
    if not getattr(clean_cache, "has_batch_dim", True):
        act = act[None]
    if act.shape[0] != tokens.shape[0]:
        raise ValueError(f"the clean cache holds {act.shape[0]} prompt(s) and corrupted_tokens {tokens.shape[0]}: "
                         "patching pairs clean and corrupted prompts row by row; give as many of each")
    pos_len = act.shape[position_axis(name)]
    if pos_len != tokens.shape[1]:
        raise ValueError(f"the clean cache's {name!r} covers {pos_len} positions and corrupted_tokens "
                         f"{tokens.shape[1]}: patching by position needs prompts of equal length")
    return act.to(tokens.device)


@torch.no_grad()
def _runs(model: Any, tokens: Int[Tensor, "1 pos"], clean: dict[str, Tensor]) -> PatchRuns:
    """The engine's runs with the clean side read from a cache rather than recomputed: the
    corrupted run is recorded once (each block's residual and its keys/values)."""
    n = model.cfg.n_layers
    kv = KVCache(model.cfg, 1, tokens.shape[1], model.dtype, model.device)
    resid = [get_act_name("resid_pre", layer) for layer in range(n)]
    final, cache = model.run_with_cache(tokens, names_filter=resid, past_kv=kv, stop_at_layer=n)
    # The clean run's own final residual is not needed (only its activations are patched in);
    # the corrupted one stands in for it as the engine reads only its length.
    return PatchRuns(model, None, tokens, clean, {layer: cache[resid[layer]] for layer in range(n)}, kv,
                     clean_final=final, corrupted_final=final)


POSITION_BLOCKS = 8


def _batched(runs: PatchRuns, sites: Sequence[Site], metric: PatchingMetric) -> Float[Tensor, " n_sites"]:
    """The sites on the engine, in POSITION_BLOCKS blocks by their first patched position: a patch
    at p cannot change the logits before p (causal attention), so a block starting at p computes
    positions p.. only, and the metric sees the corrupted run's own logits before p. (One block
    per position would halve the work of a position sweep but cut the engine's batches to a
    position each; blocks keep both nearly: n²/2 + n²/16 positions computed, 8 engine calls.)"""
    n_pos = runs.n_pos
    before = runs.logits("corrupted", "all")  # [1, pos, d_vocab]
    block = -(-n_pos // POSITION_BLOCKS)
    groups: dict[int, list[int]] = {}
    for i, site in enumerate(sites):
        first = 0 if site.positions is None else min(site.positions)
        groups.setdefault(first // block * block, []).append(i)
    values = torch.empty(len(sites))
    for p, rows in tqdm(sorted(groups.items()), desc="patching", leave=False, disable=len(groups) == 1):
        values[rows] = run_sites(runs, [sites[i] for i in rows], _per_row(metric, before[:, :p]),
                                 metric_positions=list(range(p, n_pos)), progress=len(groups) == 1)
    return values


def _per_row(metric: PatchingMetric, before: Tensor) -> Callable[[Tensor], Tensor]:
    """TL's metric (the logits of one patched run, every position -> a number) over the engine's
    rows, each row's logits from p on completed by `before` (positions 0..p-1)."""

    def rows(logits: Float[Tensor, "rows pos_from_p d_vocab"]) -> Float[Tensor, " rows"]:
        full = torch.cat([before.expand(len(logits), -1, -1), logits], dim=1)
        return torch.stack([torch.as_tensor(metric(full[i:i + 1]), dtype=torch.float32).reshape(())
                            for i in range(len(full))])

    return rows


@torch.no_grad()
def _one_forward_per_site(model: Any, tokens: Tensor, clean: dict[str, Tensor], metric: PatchingMetric,
                          sites: Sequence[Site]) -> Tensor:
    """TransformerLens' own loop, for a batch of corrupted prompts."""
    values = torch.empty(len(sites))
    for i, site in enumerate(sites):
        idx = [slice(None)] * clean[site.hook].dim()
        if site.positions is not None:
            idx[position_axis(site.hook)] = list(site.positions)
        if site.heads is not None:
            idx[head_axis(site.hook)] = site.heads[0]
        idx = tuple(idx)

        def write(x: Tensor, hook: Any, idx: tuple = idx, source: Tensor = clean[site.hook]) -> Tensor:
            x = x.clone()
            x[idx] = source[idx]
            return x

        values[i] = float(metric(model.run_with_hooks(tokens, fwd_hooks=[(site.hook, write)])))
    return values


def _n_pos(corrupted_tokens: Tensor) -> int:
    return corrupted_tokens.shape[-1]


def _heads(model: Any, act: str) -> int:
    return model.cfg.n_key_value_heads if act in ("k", "v") else model.cfg.n_heads


# ------------------------------------------------------------------------- by layer and position


def _layer_pos(act: str):
    def patch(model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: Any,
              patching_metric: PatchingMetric) -> Float[Tensor, "n_layers pos"]:
        n_layers, n_pos = model.cfg.n_layers, _n_pos(corrupted_tokens)
        sites = [Site(get_act_name(act, layer), (p,)) for layer in range(n_layers) for p in range(n_pos)]
        return _patch(model, corrupted_tokens, clean_cache, patching_metric, sites).view(n_layers, n_pos)

    patch.__name__ = f"get_act_patch_{act}"
    patch.__doc__ = (f"Each (layer, position) of `{act}` patched alone from the clean cache into the corrupted "
                     f"run: the metric per patch, [n_layers, pos] (TransformerLens' `patching.{patch.__name__}`).")
    return patch


get_act_patch_resid_pre = _layer_pos("resid_pre")
get_act_patch_resid_mid = _layer_pos("resid_mid")
get_act_patch_attn_out = _layer_pos("attn_out")
get_act_patch_mlp_out = _layer_pos("mlp_out")


# ------------------------------------------------------------------------- by head


def _head_sites(model: Any, act: str, n_pos: int, by_pos: bool) -> list[Site]:
    heads = range(_heads(model, act))
    names = [get_act_name(act, layer) for layer in range(model.cfg.n_layers)]
    if by_pos:
        return [Site(n, (p,), heads=(h,)) for n in names for p in range(n_pos) for h in heads]
    return [Site(n, None, heads=(h,)) for n in names for h in heads]


def _head_by_pos(act: str, label: str):
    def patch(model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: Any,
              patching_metric: PatchingMetric) -> Float[Tensor, "n_layers pos heads"]:
        n_pos = _n_pos(corrupted_tokens)
        sites = _head_sites(model, act, n_pos, by_pos=True)
        values = _patch(model, corrupted_tokens, clean_cache, patching_metric, sites)
        return values.view(model.cfg.n_layers, n_pos, _heads(model, act))

    patch.__name__ = f"get_act_patch_attn_head_{label}_by_pos"
    patch.__doc__ = (f"Each (layer, position, head) of `hook_{act}` patched alone: [n_layers, pos, heads] "
                     "(heads: n_key_value_heads for k and v).")
    return patch


def _head_all_pos(act: str, label: str):
    def patch(model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: Any,
              patching_metric: PatchingMetric) -> Float[Tensor, "n_layers heads"]:
        sites = _head_sites(model, act, _n_pos(corrupted_tokens), by_pos=False)
        values = _patch(model, corrupted_tokens, clean_cache, patching_metric, sites)
        return values.view(model.cfg.n_layers, _heads(model, act))

    patch.__name__ = f"get_act_patch_attn_head_{label}_all_pos"
    patch.__doc__ = (f"Each (layer, head) of `hook_{act}` patched alone at every position: [n_layers, heads] "
                     "(heads: n_key_value_heads for k and v).")
    return patch


get_act_patch_attn_head_out_by_pos = _head_by_pos("z", "out")
get_act_patch_attn_head_q_by_pos = _head_by_pos("q", "q")
get_act_patch_attn_head_k_by_pos = _head_by_pos("k", "k")
get_act_patch_attn_head_v_by_pos = _head_by_pos("v", "v")
get_act_patch_attn_head_out_all_pos = _head_all_pos("z", "out")
get_act_patch_attn_head_q_all_pos = _head_all_pos("q", "q")
get_act_patch_attn_head_k_all_pos = _head_all_pos("k", "k")
get_act_patch_attn_head_v_all_pos = _head_all_pos("v", "v")
get_act_patch_attn_head_pattern_all_pos = _head_all_pos("pattern", "pattern")


def get_act_patch_attn_head_pattern_by_pos(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: Any, patching_metric: PatchingMetric
) -> Float[Tensor, "n_layers n_heads dest_pos"]:
    """Each (layer, head, destination position) row of the attention pattern patched alone:
    [n_layers, n_heads, dest_pos] (TL's axis order for patterns)."""
    n_layers, n_heads, n_pos = model.cfg.n_layers, model.cfg.n_heads, _n_pos(corrupted_tokens)
    sites = [Site(get_act_name("pattern", layer), (p,), heads=(h,))
             for layer in range(n_layers) for h in range(n_heads) for p in range(n_pos)]
    return _patch(model, corrupted_tokens, clean_cache, patching_metric, sites).view(n_layers, n_heads, n_pos)


# ------------------------------------------------------------------------- several at once


def get_act_patch_block_every(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: Any, metric: PatchingMetric
) -> Float[Tensor, "3 n_layers pos"]:
    """resid_pre, attn_out and mlp_out patched per (layer, position), stacked: [3, n_layers, pos]
    (one engine call: the three sweeps share its batches)."""
    n_layers, n_pos = model.cfg.n_layers, _n_pos(corrupted_tokens)
    sites = [Site(get_act_name(act, layer), (p,))
             for act in ("resid_pre", "attn_out", "mlp_out") for layer in range(n_layers) for p in range(n_pos)]
    return _patch(model, corrupted_tokens, clean_cache, metric, sites).view(3, n_layers, n_pos)


def get_act_patch_attn_head_all_pos_every(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: Any, metric: PatchingMetric
) -> Float[Tensor, "5 n_layers n_heads"]:
    """Each head's output (z), q, k, v and pattern patched at every position, stacked:
    [5, n_layers, n_heads]; k and v (key/value heads) padded with zeros to n_heads, as in TL."""
    n_pos, n_heads = _n_pos(corrupted_tokens), model.cfg.n_heads
    acts = ("z", "q", "k", "v", "pattern")
    sites = [s for act in acts for s in _head_sites(model, act, n_pos, by_pos=False)]
    values = _patch(model, corrupted_tokens, clean_cache, metric, sites)
    out, start = [], 0
    for act in acts:
        n = _heads(model, act)
        part = values[start:start + model.cfg.n_layers * n].view(model.cfg.n_layers, n)
        out.append(F.pad(part, (0, n_heads - n)))
        start += model.cfg.n_layers * n
    return torch.stack(out)


def get_act_patch_attn_head_by_pos_every(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: Any, metric: PatchingMetric
) -> Float[Tensor, "5 n_layers pos n_heads"]:
    """Each head's output (z), q, k, v and pattern patched per (layer, position), stacked:
    [5, n_layers, pos, n_heads]; k and v padded with zeros to n_heads; the pattern's
    destination position is the position axis."""
    n_layers, n_pos, n_heads = model.cfg.n_layers, _n_pos(corrupted_tokens), model.cfg.n_heads
    acts = ("z", "q", "k", "v", "pattern")
    sites = [s for act in acts for s in _head_sites(model, act, n_pos, by_pos=True)]
    values = _patch(model, corrupted_tokens, clean_cache, metric, sites)
    out, start = [], 0
    for act in acts:
        n = _heads(model, act)
        part = values[start:start + n_layers * n_pos * n].view(n_layers, n_pos, n)
        out.append(F.pad(part, (0, n_heads - n)))
        start += n_layers * n_pos * n
    return torch.stack(out)


# ------------------------------------------------------------------------- TL's generic loop


def layer_pos_patch_setter(corrupted_activation: Tensor, index: Sequence[int], clean_activation: Tensor) -> Tensor:
    """index = (layer, pos) on a [batch, pos, ...] activation."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation: Tensor, index: Sequence[int],
                                       clean_activation: Tensor) -> Tensor:
    """index = (layer, pos, head) on a [batch, pos, head, ...] activation (q, k, v, z)."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation: Tensor, index: Sequence[int], clean_activation: Tensor) -> Tensor:
    """index = (layer, head) on a [batch, pos, head, ...] activation, every position."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation: Tensor, index: Sequence[int], clean_activation: Tensor) -> Tensor:
    """index = (layer, head) on a [batch, head, dest, src] pattern or scores."""
    _, head = index
    corrupted_activation[:, head] = clean_activation[:, head]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation: Tensor, index: Sequence[int],
                                        clean_activation: Tensor) -> Tensor:
    """index = (layer, head, dest_pos) on a [batch, head, dest, src] pattern."""
    _, head, dest = index
    corrupted_activation[:, head, dest] = clean_activation[:, head, dest]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation: Tensor, index: Sequence[int],
                                                 clean_activation: Tensor) -> Tensor:
    """index = (layer, head, dest_pos, src_pos) on a [batch, head, dest, src] pattern."""
    _, head, dest, src = index
    corrupted_activation[:, head, dest, src] = clean_activation[:, head, dest, src]
    return corrupted_activation


AXIS_RANGES = {"layer": "n_layers", "head_index": "heads", "head": "heads", "pos": "pos", "src_pos": "pos",
               "dest_pos": "pos"}


@torch.no_grad()
def generic_activation_patch(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: PatchingMetric,
    patch_setter: Callable[[Tensor, Sequence[int], Tensor], Tensor],
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: Any = None,
    return_index_df: bool = False,
) -> Tensor | tuple[Tensor, Any]:
    """TransformerLens' generic patch: for every index (layer first), `patch_setter(corrupted,
    index, clean)` edits hook `activation_name` of that layer in one forward of the corrupted run.
    Indices come from `index_axis_names` (every combination, result shaped by their ranges) or
    from a pandas `index_df` (one row per patch, result flat). Heads range over key/value heads for
    "k" and "v". One forward per index, as in TL."""
    tokens = corrupted_tokens.to(model.device)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give index_axis_names (e.g. ('layer', 'pos')) or an index_df")
        if unknown := [a for a in index_axis_names if a not in AXIS_RANGES]:
            raise ValueError(f"unknown index axis names {unknown}; known: {sorted(AXIS_RANGES)}")
        sizes = {"n_layers": model.cfg.n_layers, "pos": tokens.shape[1], "heads": _heads(model, activation_name)}
        shape = [sizes[AXIS_RANGES[a]] for a in index_axis_names]
        indices = [list(i) for i in itertools.product(*(range(n) for n in shape))]
    else:
        if index_axis_names is not None:
            raise ValueError("give index_axis_names or index_df, not both")
        indices = [[int(v) for v in row] for _, row in index_df.iterrows()]
        shape = [len(indices)]
    values = torch.empty(len(indices))
    for i, index in enumerate(indices):
        name = get_act_name(activation_name, index[0])
        clean = _clean_activation(clean_cache, name, tokens)

        def hook(x: Tensor, hook: Any, index: list = index, clean: Tensor = clean) -> Tensor:
            return patch_setter(x.clone(), index, clean)

        values[i] = float(patching_metric(model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])))
    values = values.view(*shape).to(model.device)
    if not return_index_df:
        return values
    if index_df is None:
        import pandas as pd  # only for the index table TL returns

        index_df = pd.DataFrame(indices, columns=list(index_axis_names))
    return values, index_df


def get_act_patch_attn_head_pattern_dest_src_pos(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: Any, patching_metric: PatchingMetric
) -> Float[Tensor, "n_layers n_heads dest_pos src_pos"]:
    """Each (layer, head, destination, source) entry of the attention pattern patched alone:
    [n_layers, n_heads, pos, pos]. One forward per entry (TL's loop)."""
    return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric,
                                    layer_head_dest_src_pos_pattern_patch_setter, "pattern",
                                    ("layer", "head_index", "dest_pos", "src_pos"))
