"""One activation-patching engine under every patch.

A *site* is (hook name, positions, heads or neurons). The engine records the source (clean) run
once, runs the target (corrupted) run once, and then evaluates many sites in one batch: the target
repeated along the batch, each row patching its own site. Nothing the patch cannot change is
recomputed: every row starts from the target's cached residual at the lowest patched layer of its
batch (`start_at_layer`), and, attention being causal, positions before the earliest patched
position keep the target's keys and values (a `KVCache` prefix) — only later positions are run.
How sites are grouped into batches depends on the device (`run_sites`, `free_tokens`). Every metric
given is applied to the logits of the same patched forwards.

`run_sites` evaluates sites independently; `forward_patched` is its single forward, which the
iterative patch also steps through with its own cache. The sweeps are in `sweeps.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.hook_names import get_act_name, layer_of
from hookedcot.interp.positions import head_axis, metric_positions, position_axis
from hookedcot.kv_cache import KVCache

Metric = Callable[[Tensor], Tensor]  # logits [rows, n_metric_positions, vocab] -> [rows]
Metrics = Union[Metric, Mapping[str, Metric]]  # one metric, or several by name (one result each)


def metrics_by_name(metric: Metrics) -> dict[str, Metric]:
    """Several metrics by name, whichever form came in (one metric is named "")."""
    return dict(metric) if isinstance(metric, Mapping) else {"": metric}


def shaped_like(metric: Metrics, values: dict[str, Any]) -> Any:
    """`values` by metric name for several metrics, the one value for one."""
    return values if isinstance(metric, Mapping) else values[""]


def per_metric(values: Any, fn: Callable[[Any], Any]) -> Any:
    """`fn` applied to one metric's values, or to each of several metrics' by name."""
    return {k: fn(v) for k, v in values.items()} if isinstance(values, Mapping) else fn(values)


@dataclass(frozen=True)
class Site:
    """Where to patch: a hook, the sequence positions (None = all) and heads or neurons (None = all)."""

    hook: str
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None

    @property
    def layer(self) -> int:
        layer = layer_of(self.hook)
        return -1 if layer is None else layer


@dataclass
class PatchRuns:
    """The clean (source) and corrupted (target) runs, computed once and reused by every batch."""

    model: Any
    clean_tokens: Tensor | None  # [1, p]; None when the clean run was given as embeddings only
    corrupted_tokens: Tensor | None  # [1, p]; None when the corrupted run was given as embeddings only
    clean_acts: dict[str, Tensor]
    corrupted_resid: dict[int, Tensor]  # layer -> resid_pre [1, p, d]
    corrupted_kv: KVCache
    clean_final: Tensor  # residual after the last block [1, p, d]
    corrupted_final: Tensor
    target_hooks: list = field(default_factory=list)
    # Positions before this one hold the same activations in both runs (same tokens, causal model,
    # no hooks of any kind — target, source, persistent or scoped — shaping either run), so
    # patching there changes nothing: 0 when unknown.
    shared_prefix: int = 0
    corrupted_embeds: Tensor | None = None  # [1, p, d] input embeddings of the corrupted run, if given so
    source_hooks: list = field(default_factory=list)  # shape the clean run, also when `ensure` records more of it
    clean_embeds: Tensor | None = None  # [1, p, d] input embeddings of the clean run, if given so

    @property
    def n_pos(self) -> int:
        return self.clean_final.shape[1]

    @property
    def label_tokens(self) -> Tensor | None:
        """The tokens position labels name: the corrupted run's, or the clean run's if it has none
        (None when both runs were given as embeddings alone)."""
        return self.clean_tokens if self.corrupted_tokens is None else self.corrupted_tokens

    def ensure(self, names: Sequence[str]) -> "PatchRuns":
        """Record clean activations for hooks this object was not prepared with (one more clean run)."""
        missing = [n for n in names if n not in self.clean_acts]
        if missing:
            clean = {"inputs_embeds": self.clean_embeds} if self.clean_embeds is not None else {"input": self.clean_tokens}
            with torch.no_grad():
                _, cache = self.model.run_with_cache(**clean, names_filter=missing, fwd_hooks=list(self.source_hooks),
                                                     stop_at_layer=self.model.cfg.n_layers)
            self.clean_acts.update(cache.items())
        return self

    def metric_positions(self, spec: Any) -> list[int]:
        """The positions metrics read in this prompt (`positions.metric_positions`)."""
        return metric_positions(spec, self.n_pos)

    @torch.no_grad()
    def logits(self, which: str, positions: Any = (-1,)) -> Tensor:
        """Baseline logits [1, n, vocab] at `positions` (increasing), computed exactly as patched rows' are."""
        final = {"clean": self.clean_final, "corrupted": self.corrupted_final}[which]
        return logits_at(self.model, final, self.metric_positions(positions))


def as_tokens(model: Any, x: str | Tensor) -> Tensor:
    if isinstance(x, str):
        return model.to_tokens(x)
    x = x.to(model.device)
    x = x[None] if x.dim() == 1 else x
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"patching takes one sequence at a time ([pos] or [1, pos]); got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def prepare_runs(
    model: Any,
    clean: str | Tensor | None,
    corrupted: str | Tensor | None,
    hooks: Sequence[str],
    target_hooks: Sequence = (),
    source_hooks: Sequence = (),
    corrupted_embeds: Tensor | None = None,
    clean_embeds: Tensor | None = None,
) -> PatchRuns:
    """Run clean and corrupted once. `target_hooks` stay active in every patched run (e.g. the
    noise of a causal-tracing corruption); `source_hooks` shape the clean run. Either run may be
    given as input embeddings, `clean_embeds` / `corrupted_embeds` [1, pos, d_model] (a
    continuous-thought model's inputs: `hookedcot.cot.latent.LatentTrace.embeds`), instead of
    tokens; its tokens may then be None, or given beside the embeddings to label positions."""
    clean_t = None if clean is None else as_tokens(model, clean)
    corrupt_t = None if corrupted is None else as_tokens(model, corrupted)
    clean_embeds = _checked_embeds(model, clean_embeds, clean_t, "clean")
    corrupted_embeds = _checked_embeds(model, corrupted_embeds, corrupt_t, "corrupted")
    clean_len = clean_embeds.shape[1] if clean_embeds is not None else clean_t.shape[1]
    corrupt_len = corrupted_embeds.shape[1] if corrupted_embeds is not None else corrupt_t.shape[1]
    if clean_len != corrupt_len:
        raise ValueError(
            f"clean and corrupted inputs have {clean_len} and {corrupt_len} tokens; patching by "
            "position needs equal lengths (use hookedcot.interp.data.keep_same_length_pairs, or pad the prompts)"
        )
    n = model.cfg.n_layers
    clean_in = {"inputs_embeds": clean_embeds} if clean_embeds is not None else {"input": clean_t}
    clean_final, clean_cache = model.run_with_cache(
        **clean_in, names_filter=list(dict.fromkeys(hooks)), fwd_hooks=list(source_hooks), stop_at_layer=n
    )
    kv = KVCache(model.cfg, 1, clean_len, model.dtype, model.device)
    resid_names = [get_act_name("resid_pre", layer) for layer in range(n)]
    inputs = {"inputs_embeds": corrupted_embeds} if corrupted_embeds is not None else {"input": corrupt_t}
    corrupt_final, corrupt_cache = model.run_with_cache(
        **inputs, names_filter=resid_names, fwd_hooks=list(target_hooks), past_kv=kv, stop_at_layer=n
    )
    plain_runs = (not target_hooks and not source_hooks and not model.active_hook_names()
                  and corrupted_embeds is None and clean_embeds is None)
    return PatchRuns(
        model, clean_t, corrupt_t, dict(clean_cache.items()),
        {layer: corrupt_cache["resid_pre", layer] for layer in range(n)},
        kv, clean_final, corrupt_final, list(target_hooks),
        shared_prefix=_shared_prefix(clean_t, corrupt_t) if plain_runs else 0,
        corrupted_embeds=corrupted_embeds, source_hooks=list(source_hooks), clean_embeds=clean_embeds,
    )


def _checked_embeds(model: Any, embeds: Tensor | None, tokens: Tensor | None, run: str) -> Tensor | None:
    """One run's input embeddings as [1, pos, d_model] on the model's device and dtype; without
    them the run needs its tokens. Tokens given beside embeddings (labels) must be as long."""
    if embeds is None:
        if tokens is None:
            raise ValueError(f"give the {run} run: tokens or text as `{run}`, or input embeddings as `{run}_embeds`")
        return None
    embeds = embeds.to(model.device, model.dtype)
    embeds = embeds[None] if embeds.dim() == 2 else embeds
    if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[2] != model.cfg.d_model:
        raise ValueError(f"{run}_embeds must be [1, pos, {model.cfg.d_model}]; got {tuple(embeds.shape)}")
    if tokens is not None and tokens.shape[1] != embeds.shape[1]:
        raise ValueError(f"the {run} run's tokens ({tokens.shape[1]}) and {run}_embeds ({embeds.shape[1]} positions) "
                         f"differ in length: give the same run's tokens beside its embeddings, or `{run}=None`")
    return embeds


def _shared_prefix(a: Tensor, b: Tensor) -> int:
    """Number of leading positions where the two token rows agree."""
    differ = (a[0] != b[0]).nonzero()
    return int(differ[0, 0]) if len(differ) else a.shape[1]


def logits_at(model: Any, final_resid: Tensor, positions: Sequence[int]) -> Tensor:
    """Logits at chosen positions only (the unembedding is the costly part for big vocabularies)."""
    idx = torch.tensor(list(positions), device=final_resid.device)
    x = final_resid[:, idx]
    if x.shape[0] * x.shape[1] == 1:
        # BLAS takes a matrix-vector kernel for a single row, whose rounding differs from the
        # matrix-matrix kernel the batched rows get; two rows keep baselines bit-identical.
        return model.unembed_resid(x.expand(2, -1, -1))[:1]
    return model.unembed_resid(x)


def _patch_hook(rows_sites: list[tuple[int, Site]], clean: Tensor):
    """A hook writing each row's site from the clean activation (indexed by absolute position)."""
    name = rows_sites[0][1].hook
    pos_axis, h_axis = position_axis(name), head_axis(name)
    clean = clean.movedim(pos_axis, 1)  # [1, p, ...]: positions first; heads (if any) then at axis 2

    def hook(x: Tensor, h) -> Tensor:
        first = int(h.positions[0]) if len(h.positions) else 0
        n_here = x.shape[pos_axis]
        x = x.clone()
        view = x.movedim(pos_axis, 1)  # writes go through to x
        for row, site in rows_sites:
            pos_all = range(first, first + n_here) if site.positions is None else site.positions
            pos = torch.tensor([p for p in pos_all if first <= p < first + n_here], dtype=torch.long, device=x.device)
            if not len(pos):
                continue
            local = pos - first
            if h_axis is not None and site.heads is not None:
                heads = torch.tensor(site.heads, device=x.device)
                view[row, local[:, None], heads[None, :]] = clean[0, pos[:, None], heads[None, :]]
            elif site.neurons is not None:
                neurons = torch.tensor(site.neurons, device=x.device)
                view[row, local[:, None], ..., neurons[None, :]] = clean[0, pos[:, None], ..., neurons[None, :]]
            else:
                view[row, local] = clean[0, pos]
        return x

    return hook


def auto_batch_size(model: Any, n_new: int, n_ctx: int, n_metric: int, requested: int | str | None) -> int:
    """Rows per batch so the batch's activations, KV prefix and metric logits stay within a memory
    budget (a quarter of free memory, at most 2 GiB on CPU)."""
    if isinstance(requested, int):
        return max(1, requested)
    c = model.cfg
    elem = torch.finfo(model.dtype).bits // 8
    per_row = elem * (
        n_new * (12 * c.d_model + 4 * c.d_mlp + 2 * c.n_heads * c.d_head)
        + 2 * c.n_layers * c.n_key_value_heads * c.d_head * n_ctx
    ) + 4 * n_metric * c.d_vocab * 3
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget = free // 4
    else:
        budget = min(2 << 30, _available_ram() // 4)
    return int(max(1, min(256, budget // max(per_row, 1))))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


@torch.no_grad()
def run_sites(
    runs: PatchRuns,
    sites: Sequence[Site],
    metric: Metrics,
    metric_positions: Any = (-1,),
    batch_size: int | str | None = "auto",
    progress: bool = True,
    reuse_prefix: bool = True,
    skip_inert: bool = True,
) -> Tensor | dict[str, Tensor]:
    """Metric value per site [len(sites)], each site patched alone into the corrupted run. Given
    a dict of metrics {name: fn}, a dict {name: values} from the same patched forwards.

    Sites are sorted by (layer, first position) and cut into batches: a batch recomputes every row
    from its lowest layer and earliest position on, so on a CPU its rows need nearly the same work;
    on a GPU, where small batches cost launches rather than FLOPs, rows share a batch more freely
    (`free_tokens`).
    A site inside the prefix both runs share (`PatchRuns.shared_prefix`) patches in the value
    that is already there: it gets the corrupted run's own metric without a forward
    (`skip_inert=False` runs it anyway)."""
    model = runs.model
    n_pos = runs.n_pos
    metrics = metrics_by_name(metric)
    sites = [_checked_site(s, n_pos) for s in sites]
    metric_pos = runs.metric_positions(metric_positions)
    values = {k: torch.empty(len(sites)) for k in metrics}
    inert = [i for i, s in enumerate(sites) if skip_inert and _last_pos(s, n_pos) < runs.shared_prefix]
    if inert:
        base = runs.logits("corrupted", metric_pos)
        for k, fn in metrics.items():
            values[k][inert] = fn(base).float().cpu()
    inert_set = set(inert)
    live = [i for i in range(len(sites)) if i not in inert_set]
    order = sorted(live, key=lambda i: (sites[i].layer, _first_pos(sites[i], n_pos)))
    bar = tqdm(total=len(order), disable=not progress, desc="patching", leave=False)
    for chunk in _batches(sites, order, n_pos, metric_pos, batch_size, reuse_prefix, model, free_tokens(model, n_pos)):
        for k, v in _run_batch(runs, [sites[j] for j in chunk], metrics, metric_pos, reuse_prefix).items():
            values[k][chunk] = v
        bar.update(len(chunk))
    bar.close()
    return shaped_like(metric, values)


# Work per layer below which a small model's GPU batch is launch-bound rather than compute-bound
# (scaled by SM count; float32 matmuls run ~1/16 as fast).
LAUNCH_BOUND_FLOPS, REFERENCE_SMS, FP32_SLOWDOWN = 4e11, 132, 16


def free_tokens(model: Any, n_ctx: int) -> int:
    """Tokens per layer a batch may compute at no cost on this device. On a GPU a patching batch of
    a small model is launch-bound, so rows that start at different positions share a batch until
    its work (matmuls, and attention over `n_ctx` keys) reaches `LAUNCH_BOUND_FLOPS` per layer;
    on a CPU every FLOP costs time: 0."""
    if model.device.type != "cuda":
        return 0
    c = model.cfg
    params = c.d_model * (2 * c.n_heads * c.d_head + 2 * c.n_key_value_heads * c.d_head) + 3 * c.d_model * c.d_mlp
    per_token = 2 * params + 4 * n_ctx * c.n_heads * c.d_head
    budget = LAUNCH_BOUND_FLOPS * torch.cuda.get_device_properties(model.device).multi_processor_count / REFERENCE_SMS
    if model.dtype not in (torch.bfloat16, torch.float16):
        budget /= FP32_SLOWDOWN
    return int(budget / per_token)


def _batches(sites, order, n_pos, metric_pos, batch_size, reuse_prefix, model, free: int = 0, max_waste: float = 1.3):
    """Consecutive runs of `order` (sorted by layer, position) cut so that what a batch computes —
    every row from its lowest layer and earliest position on — stays within `max_waste` × the work
    its rows need on their own (unless it computes at most `free` tokens per layer: see
    `free_tokens`), and within the memory budget."""
    n_layers = model.cfg.n_layers
    i = 0
    while i < len(order):
        l_min = max(0, sites[order[i]].layer)
        p_min = min(_first_pos(sites[order[i]], n_pos), metric_pos[0]) if reuse_prefix else 0
        # rows may reach back to position 0 once waste is free: size the batch for that
        size = auto_batch_size(model, n_pos - (0 if free else p_min), n_pos, len(metric_pos), batch_size)
        need = (n_layers - l_min) * (n_pos - p_min)
        j = i + 1
        while j < len(order) and j - i < size:
            site = sites[order[j]]
            p = min(_first_pos(site, n_pos), metric_pos[0]) if reuse_prefix else 0
            tokens = (j - i + 1) * (n_pos - min(p_min, p))
            cost = tokens * (n_layers - l_min)
            wasteful = cost > max_waste * (need + (n_layers - max(0, site.layer)) * (n_pos - p))
            if isinstance(batch_size, str) and wasteful and tokens > free:
                break
            need += (n_layers - max(0, site.layer)) * (n_pos - p)
            p_min = min(p_min, p)
            j += 1
        yield order[i:j]
        i = j


def _checked_site(site: Site, n_pos: int) -> Site:
    """The site with absolute positions; a hook outside the blocks or a position outside the
    prompt is an error (the batched runs start at a block, so such a patch would silently do nothing)."""
    if layer_of(site.hook) is None:
        hint = " (patch blocks.0.hook_resid_pre instead: the same tensor)" if site.hook == "hook_embed" else ""
        raise ValueError(f"run_sites patches hooks inside the blocks; {site.hook!r} is outside them{hint}")
    if site.heads is not None and head_axis(site.hook) is None:
        raise ValueError(f"site {site.hook!r} has no head axis: heads live in hook_q/k/v/z/result/pattern/attn_scores")
    if site.heads is not None and site.neurons is not None:
        raise ValueError(f"site {site.hook!r} names both heads and neurons; the engine patches one or the other "
                         "(for some dimensions of some heads, patch with a hand-written hook)")
    if site.positions is None:
        return site
    if not site.positions:
        raise ValueError(f"site {site.hook!r} selects no positions (positions=None patches them all)")
    if bad := [p for p in site.positions if not -n_pos <= p < n_pos]:
        raise ValueError(f"site {site.hook!r}: positions {bad} fall outside the {n_pos}-token prompt")
    return replace(site, positions=tuple(p % n_pos for p in site.positions))


def _first_pos(site: Site, n_pos: int) -> int:
    return 0 if site.positions is None else min(p % n_pos for p in site.positions)


def _last_pos(site: Site, n_pos: int) -> int:
    return n_pos - 1 if site.positions is None else max(p % n_pos for p in site.positions)


@torch.no_grad()
def forward_patched(
    runs: PatchRuns,
    sites: Sequence[Site],
    p_min: int = 0,
    start: int | None = None,
    kv: KVCache | None = None,
    inputs: Tensor | None = None,
    observers: Sequence = (),
) -> Tensor:
    """The corrupted run with row i's site patched from the clean run: the residual after the last
    block, [len(sites), n_pos - p_min, d_model]. Only positions from `p_min` on are computed; the
    earlier ones are read from `kv` (default: a copy of the corrupted run's cache; a given cache is
    extended in place). The forward starts at block `start` (default: the lowest patched block)
    from the corrupted run's residual there, or, given `inputs` (token ids or input embeddings of
    positions `p_min`..), from the embedding. `observers` are hooks run before the patch. Site
    positions before `p_min` are not written: their patched values must already be in `kv`."""
    model, rows = runs.model, len(sites)
    if start is not None and inputs is None and start > min(max(0, s.layer) for s in sites):
        raise ValueError(f"forward_patched starts at block {start}, after a site's block "
                         f"{min(max(0, s.layer) for s in sites)}: that patch would never be written")
    if kv is None:
        kv = runs.corrupted_kv.select_rows(torch.zeros(rows, dtype=torch.long, device=model.device))
    kv.truncate(p_min)
    by_hook: dict[str, list[tuple[int, Site]]] = {}
    for row, site in enumerate(sites):
        by_hook.setdefault(site.hook, []).append((row, site))
    hooks = runs.target_hooks + list(observers) + [(name, _patch_hook(rs, runs.clean_acts[name])) for name, rs in by_hook.items()]
    n = model.cfg.n_layers
    if inputs is None:
        start = max(0, min(s.layer for s in sites)) if start is None else start
        resid = runs.corrupted_resid[start][:, p_min:].expand(rows, -1, -1)
        return model.run_with_hooks(resid, start_at_layer=start, stop_at_layer=n, past_kv=kv, fwd_hooks=hooks)
    given = {"inputs_embeds": inputs} if inputs.is_floating_point() else {"input": inputs}
    return model.run_with_hooks(**given, stop_at_layer=n, past_kv=kv, fwd_hooks=hooks)


def _run_batch(runs: PatchRuns, sites: list[Site], metrics: dict[str, Metric], metric_pos: list[int],
               reuse_prefix: bool) -> dict[str, Tensor]:
    """Every metric on the logits of one batched patched forward."""
    p_min = min(min(_first_pos(s, runs.n_pos) for s in sites), metric_pos[0]) if reuse_prefix else 0
    final = forward_patched(runs, sites, p_min)
    logits = logits_at(runs.model, final, [p - p_min for p in metric_pos])
    return {k: fn(logits).float().cpu() for k, fn in metrics.items()}


def kl_metric(runs: PatchRuns, metric_positions: Any = (-1,)) -> Metric:
    """KL(patched || corrupted) summed over the metric positions."""
    from hookedcot.interp.metrics import kl_divergence

    base = runs.logits("corrupted", metric_positions)

    def metric(logits: Tensor) -> Tensor:
        return kl_divergence(logits, base.expand_as(logits)).sum(-1)

    return metric
