"""One activation-patching engine under every sweep.

A *site* is (hook name, positions, heads or neurons). The engine records the source (clean) run
once, runs the target (corrupted) run once, and then evaluates many sites in one batch: the target
repeated along the batch, each row patching its own site. Nothing the patch cannot change is
recomputed: every row starts from the target's cached residual at the lowest patched layer of its
batch (`start_at_layer`), and, attention being causal, positions before the earliest patched
position keep the target's keys and values (a `KVCache` prefix) — only later positions are run.
How sites are grouped into batches depends on the device (`run_sites`, `free_tokens`). The sweeps
(by layer, layer × position, head, component, span) and the naive reference loop are thin callers
of `run_sites`, in `sweeps.py`; importing them from here still works.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.hook_names import get_act_name, layer_of, spec_of
from hookedcot.kv_cache import KVCache

Metric = Callable[[Tensor], Tensor]  # logits [rows, n_metric_positions, vocab] -> [rows]
HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k", "hook_result")


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
    clean_tokens: Tensor  # [1, p]
    corrupted_tokens: Tensor  # [1, p]
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

    @property
    def n_pos(self) -> int:
        return self.corrupted_tokens.shape[1]

    def ensure(self, names: Sequence[str]) -> "PatchRuns":
        """Record clean activations for hooks this object was not prepared with (one more clean run)."""
        missing = [n for n in names if n not in self.clean_acts]
        if missing:
            with torch.no_grad():
                _, cache = self.model.run_with_cache(self.clean_tokens, names_filter=missing, stop_at_layer=self.model.cfg.n_layers)
            self.clean_acts.update(cache.items())
        return self

    @torch.no_grad()
    def logits(self, which: str, positions: Sequence[int]) -> Tensor:
        """Baseline logits [1, n, vocab] at `positions`, computed exactly as patched rows' are."""
        final = {"clean": self.clean_final, "corrupted": self.corrupted_final}[which]
        return logits_at(self.model, final, [p % self.n_pos for p in positions])


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
    clean: str | Tensor,
    corrupted: str | Tensor,
    hooks: Sequence[str],
    target_hooks: Sequence = (),
    source_hooks: Sequence = (),
) -> PatchRuns:
    """Run clean and corrupted once. `target_hooks` stay active in every patched run (e.g. the
    noise of a causal-tracing corruption); `source_hooks` shape the clean run."""
    clean_t, corrupt_t = as_tokens(model, clean), as_tokens(model, corrupted)
    if clean_t.shape != corrupt_t.shape:
        raise ValueError(
            f"clean and corrupted inputs have {clean_t.shape[1]} and {corrupt_t.shape[1]} tokens; patching by "
            "position needs equal lengths (use hookedcot.interp.data.same_length_pairs, or pad the prompts)"
        )
    n = model.cfg.n_layers
    clean_final, clean_cache = model.run_with_cache(
        clean_t, names_filter=list(dict.fromkeys(hooks)), fwd_hooks=list(source_hooks), stop_at_layer=n
    )
    kv = KVCache(model.cfg, 1, clean_t.shape[1], model.dtype, model.device)
    resid_names = [get_act_name("resid_pre", layer) for layer in range(n)]
    corrupt_final, corrupt_cache = model.run_with_cache(
        corrupt_t, names_filter=resid_names, fwd_hooks=list(target_hooks), past_kv=kv, stop_at_layer=n
    )
    plain_runs = not target_hooks and not source_hooks and not model.active_hook_names()
    return PatchRuns(
        model, clean_t, corrupt_t, dict(clean_cache.items()),
        {layer: corrupt_cache["resid_pre", layer] for layer in range(n)},
        kv, clean_final, corrupt_final, list(target_hooks),
        shared_prefix=_shared_prefix(clean_t, corrupt_t) if plain_runs else 0,
    )


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
        return model.unembed(model.ln_final(x.expand(2, -1, -1)))[:1]
    return model.unembed(model.ln_final(x))


def _patch_hook(rows_sites: list[tuple[int, Site]], clean: Tensor):
    """A hook writing each row's site from the clean activation (indexed by absolute position)."""
    is_head = spec_of(rows_sites[0][1].hook).name in HEAD_HOOKS
    is_pattern = spec_of(rows_sites[0][1].hook).name in ("hook_pattern", "hook_attn_scores")

    def hook(x: Tensor, h) -> Tensor:
        first = int(h.positions[0]) if len(h.positions) else 0
        n_here = x.shape[2] if is_pattern else x.shape[1]
        x = x.clone()
        for row, site in rows_sites:
            pos_all = range(first, first + n_here) if site.positions is None else site.positions
            pos = torch.tensor([p for p in pos_all if first <= p < first + n_here], dtype=torch.long, device=x.device)
            if not len(pos):
                continue
            local = pos - first
            if is_pattern:  # b h q s: positions index queries; keys span the whole prefix
                for head in range(x.shape[1]) if site.heads is None else site.heads:
                    x[row, head, local] = clean[0, head, pos]
            elif is_head and site.heads is not None:
                for head in site.heads:
                    x[row, local, head] = clean[0, pos, head]
            elif site.neurons is not None:
                neurons = torch.tensor(site.neurons, device=x.device)
                x[row, local[:, None], neurons[None, :]] = clean[0, pos[:, None], neurons[None, :]]
            else:
                x[row, local] = clean[0, pos]
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
    metric: Metric,
    metric_positions: Sequence[int] = (-1,),
    batch_size: int | str | None = "auto",
    progress: bool = True,
    reuse_prefix: bool = True,
    skip_inert: bool = True,
) -> Tensor:
    """Metric value per site [len(sites)], each site patched alone into the corrupted run.

    Sites are sorted by (layer, first position) and cut into batches: a batch recomputes every row
    from its lowest layer and earliest position on, so on a CPU its rows need nearly the same work;
    on a GPU, where small batches cost launches rather than FLOPs, rows share a batch more freely
    (`free_tokens`).
    A site inside the prefix both runs share (`PatchRuns.shared_prefix`) patches in the value
    that is already there: it gets the corrupted run's own metric without a forward
    (`skip_inert=False` runs it anyway)."""
    model = runs.model
    n_pos = runs.n_pos
    sites = [_checked_site(s, n_pos) for s in sites]
    metric_pos = sorted({p % n_pos for p in metric_positions})
    values = torch.empty(len(sites))
    inert = [i for i, s in enumerate(sites) if skip_inert and _last_pos(s, n_pos) < runs.shared_prefix]
    if inert:
        values[inert] = metric(runs.logits("corrupted", metric_pos)).float().cpu()
    inert_set = set(inert)
    live = [i for i in range(len(sites)) if i not in inert_set]
    order = sorted(live, key=lambda i: (sites[i].layer, _first_pos(sites[i], n_pos)))
    bar = tqdm(total=len(order), disable=not progress, desc="patching", leave=False)
    for chunk in _batches(sites, order, n_pos, metric_pos, batch_size, reuse_prefix, model, free_tokens(model, n_pos)):
        values[chunk] = _run_batch(runs, [sites[j] for j in chunk], metric, metric_pos, reuse_prefix).float().cpu()
        bar.update(len(chunk))
    bar.close()
    return values


# Work per layer below which a GPU's time is set by kernel launches, not arithmetic: about 0.5 ms
# of an H100/H200's bf16 matmul rate (132 SMs), the launch floor of one layer of a small model
# measured there. Scaled by the card's SM count; float32 matmuls run ~1/16 of that rate.
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
    if site.positions is None:
        return site
    if bad := [p for p in site.positions if not -n_pos <= p < n_pos]:
        raise ValueError(f"site {site.hook!r}: positions {bad} fall outside the {n_pos}-token prompt")
    return replace(site, positions=tuple(p % n_pos for p in site.positions))


def _first_pos(site: Site, n_pos: int) -> int:
    return 0 if site.positions is None else min(p % n_pos for p in site.positions)


def _last_pos(site: Site, n_pos: int) -> int:
    return n_pos - 1 if site.positions is None else max(p % n_pos for p in site.positions)


def _run_batch(runs: PatchRuns, sites: list[Site], metric: Metric, metric_pos: list[int], reuse_prefix: bool) -> Tensor:
    model, n_pos = runs.model, runs.n_pos
    rows = len(sites)
    start = max(0, min(s.layer for s in sites))
    p_min = min(min(_first_pos(s, n_pos) for s in sites), metric_pos[0]) if reuse_prefix else 0
    resid = runs.corrupted_resid[start][:, p_min:].expand(rows, -1, -1)
    kv = runs.corrupted_kv.select_rows(torch.zeros(rows, dtype=torch.long, device=model.device))
    kv.truncate(p_min)
    by_hook: dict[str, list[tuple[int, Site]]] = {}
    for row, site in enumerate(sites):
        by_hook.setdefault(site.hook, []).append((row, site))
    hooks = [(name, _patch_hook(rs, runs.clean_acts[name])) for name, rs in by_hook.items()]
    final = model.run_with_hooks(
        resid, start_at_layer=start, stop_at_layer=model.cfg.n_layers, past_kv=kv,
        fwd_hooks=runs.target_hooks + hooks,
    )
    return metric(logits_at(model, final, [p - p_min for p in metric_pos]))


# ---------------------------------------------------------------- helpers the sweeps share
def _label_tokens(model: Any, tokens: Tensor) -> list[str]:
    try:
        return [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(tokens[0]))]
    except ValueError:
        return [str(i) for i in range(tokens.shape[1])]


def _resolve_positions(n_pos: int, positions: Sequence[int] | slice | str | None) -> list[int]:
    """Positions as a list: None/'all', a slice, 'last N', or explicit (negative from the end)."""
    if positions is None or positions == "all":
        return list(range(n_pos))
    if isinstance(positions, str):
        parts = positions.split()
        if len(parts) == 2 and parts[0] == "last" and parts[1].isdigit():
            return list(range(max(0, n_pos - int(parts[1])), n_pos))
        raise ValueError(f"positions {positions!r}: use 'all', 'last N', a slice or a list of ints")
    if isinstance(positions, slice):
        return list(range(n_pos))[positions]
    out = [p % n_pos for p in positions]
    if any(not -n_pos <= p < n_pos for p in positions):
        raise ValueError(f"positions {list(positions)} fall outside a {n_pos}-token prompt")
    return out


def kl_metric(runs: PatchRuns, metric_positions: Sequence[int] = (-1,)) -> Metric:
    """KL(patched || corrupted) summed over the metric positions (seed 001's choice)."""
    from hookedcot.interp.metrics import kl_divergence

    base = runs.logits("corrupted", metric_positions)

    def metric(logits: Tensor) -> Tensor:
        return kl_divergence(logits, base.expand_as(logits)).sum(-1)

    return metric


_MOVED_TO_SWEEPS = {"patch_layer_position", "patch_layers", "patch_heads", "patch_components", "COMPONENTS",
                    "naive_patch_loop"}


def __getattr__(name: str) -> Any:
    """`from hookedcot.interp.patching import patch_layer_position` (the old home) still works."""
    if name in _MOVED_TO_SWEEPS:
        from hookedcot.interp import sweeps

        return getattr(sweeps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
