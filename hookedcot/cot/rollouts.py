"""Sampled continuations ("rollouts") of a prefix, all rows sharing the prefix's KV cache.

The prefix runs once (batch 1) into a KV cache; its keys and values are held once for every row
(`SharedPrefixKVCache`: each decode step reads them once for all rows, one matrix product per kv
head group, instead of once per row) and its last logits give every row's first token, so N
rollouts cost one prefill plus N rows of decoding, not N prefills. Rows that finish (eos, a stop string, `max_new_tokens`) are handed back
at once (`on_rollout`, e.g. a line of a resumable file) and stop costing compute: once a quarter
of the batch is done the live rows move to the front of the cache, in place, and the batch
narrows to them (moving a row copies its new positions only; measured before the prefix was
shared, when a move copied the whole context: SmolLM2, 1 CPU thread, 1,500 tokens, a row cost
~17 ms a step and moving one ~5 ms, and gathering the rows into a new buffer 10 × more). Rows a batch holds follow a memory budget (`rows_per_batch`).
Temperature 0 decodes one row and copies it: every rollout is the greedy continuation.

Seeds, the rule a rollout's tokens follow (documented so anyone can reproduce one):
- rollout `index` of a prefix has its own seed `rollout_seed(seed, key, index)`: the first 8 bytes
  (little-endian) of sha256(f"hookedcot.rollout/{seed}/{key}/{index}"), where `key` defaults to
  `prefix_key(prefix_tokens)` (sha256 of the ids, 16 hex digits), so the same prefix gets the
  same rollouts whoever asks and in whatever order;
- that seed seeds a CPU `torch.Generator`, which draws `max_new_tokens` float64 uniforms
  `u_0, u_1, ...` (`torch.rand`); new token t uses `u_t`, and nothing else is random;
- token t is picked by inverse CDF: logits / temperature; top-k keeps the k largest logits (the
  distribution renormalised over them); top-p keeps, in descending probability order, every token
  whose preceding mass is < top_p; the kept probabilities, in that order, are cumulated (float64)
  and the first token whose cumulative mass exceeds `u_t` × their total is the pick. Temperature 0
  is greedy (argmax) and draws nothing.
A row's tokens thus depend on its seed and its own logits alone, never on which rows share its
batch: a batched rollout equals the same rollout run alone, up to the last bits of the logits a
different batch shape can change (a draw that close to a boundary of the CDF is the only way two
runs can differ).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.cot.answers import extract_answer
from hookedcot.cot.trace import THINK
from hookedcot.kv_cache import KVCache, SharedPrefixKVCache

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT

FIRST_CANDIDATES = 64  # top-p looks at this many tokens first, 8 × more for rows whose mass falls short
COMPACT_FRACTION = 0.25  # narrow the batch to its live rows once this fraction of it is done
CPU_BUDGET = 2 << 30  # bytes of KV cache and per-row buffers on a CPU (capped at a quarter of free RAM)
GPU_BUDGET_FRACTION = 0.5  # of the free GPU memory


@dataclass(frozen=True)
class Sampling:
    """What a rollout's tokens depend on besides the model, the prefix and the seed."""

    temperature: float = 0.6
    top_p: float | None = 0.95
    top_k: int | None = None
    max_new_tokens: int = 1024
    stop_strings: tuple[str, ...] = ()
    stop_at_eos: bool = True
    eos_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's (else the config's) eos ids

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings or ()))
        if self.eos_token_ids is not None:
            ids = [self.eos_token_ids] if isinstance(self.eos_token_ids, int) else self.eos_token_ids
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in ids))

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "stop_strings": list(self.stop_strings)}
        return out | {"eos_token_ids": None if self.eos_token_ids is None else list(self.eos_token_ids)}


@dataclass
class Rollout:
    """One sampled continuation. `tokens` are the new ids (a final eos included); `text` decodes
    them (the eos left out); `finish` is "eos", "stop" (a stop string) or "length"."""

    index: int
    seed: int
    tokens: list[int]
    text: str
    answer: str | None
    finish: str
    prefix: int | None = None  # which prefix of a CoT (`resample_steps`), None for a lone prefix
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Rollout":
        known = {"index", "seed", "tokens", "text", "answer", "finish", "prefix"}
        return cls(**{k: data.get(k) for k in known}, extra={k: v for k, v in data.items() if k not in known})


def prefix_key(tokens: Sequence[int]) -> str:
    """A prefix's default seed key: 16 hex digits of sha256 over its ids written as "1,2,3"."""
    return hashlib.sha256(",".join(str(int(t)) for t in tokens).encode()).hexdigest()[:16]


def rollout_seed(seed: int, key: int | str, index: int) -> int:
    """The seed of rollout `index` of the prefix keyed `key` (see the module docstring)."""
    digest = hashlib.sha256(f"hookedcot.rollout/{seed}/{key}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniforms(seed: int, n: int) -> Tensor:
    """The `n` float64 uniforms a rollout with this seed draws, in order."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rollout_answer(text: str, think: tuple[str, str] | None = THINK) -> str | None:
    """A rollout's answer, read as `CoT.answer` reads a trace's: from the text after the closing
    think delimiter if there is one, else from the text itself."""
    if think is not None and think[1] and think[1] in text:
        before, after = text.rsplit(think[1], 1)
        return extract_answer(after) or extract_answer(before)
    return extract_answer(text)


@torch.inference_mode()
def sample_tokens(logits: Tensor, u: Tensor, sampling: Sampling) -> Tensor:
    """Each row's next token from its logits [b, vocab] and its uniform u [b] (the module's rule).
    Top-p reads the FIRST_CANDIDATES most likely tokens (8 × more for a row whose mass falls short)
    instead of sorting the vocabulary; without top-p or top-k every step sorts it whole."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    z = logits.float() / sampling.temperature
    vocab = z.shape[-1]
    cap = min(sampling.top_k, vocab) if sampling.top_k else vocab
    lse = torch.topk(z, cap).values.logsumexp(-1) if cap < vocab else z.logsumexp(-1)
    top_p = sampling.top_p if sampling.top_p is not None and sampling.top_p < 1 else None
    k = min(FIRST_CANDIDATES, cap) if top_p is not None else cap
    picks = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    todo = torch.arange(z.shape[0], device=z.device)
    while todo.numel():
        values, ids = torch.topk(z[todo], k)  # sorted, descending
        probs = (values - lse[todo, None]).exp().double()
        cum = probs.cumsum(-1)
        if top_p is None or k == cap:
            enough = torch.ones_like(todo, dtype=torch.bool)
        else:
            enough = cum[:, -1] >= top_p
        if top_p is not None:
            probs = probs * ((cum - probs) < top_p)  # keep the tokens before the mass reaches top_p
        kept_cum = probs[enough].cumsum(-1)
        total = kept_cum[:, -1:]
        n_kept = (probs[enough] > 0).sum(-1, keepdim=True).clamp(min=1)
        j = torch.searchsorted(kept_cum, u[todo][enough, None].to(kept_cum.dtype) * total, right=True)
        picks[todo[enough]] = ids[enough].gather(-1, torch.minimum(j, n_kept - 1))[:, 0]
        todo, k = todo[~enough], min(k * 8, cap)
    return picks


def rows_per_batch(model: "HookedCoT", context: int, memory_budget: int | None = None) -> int:
    """Rows whose KV cache (`context` positions) and per-row buffers fit the budget: bytes a row =
    2 × layers × kv heads × d_head × context × dtype size, plus logits and sampling buffers
    (4 float32 vocab rows) and the MLP's activations. Budget: `memory_budget` bytes, else half of
    the free GPU memory, else min(2 GiB, a quarter of the free RAM)."""
    c = model.cfg
    elem = torch.finfo(model.dtype).bits // 8
    per_row = 2 * c.n_layers * c.n_key_value_heads * c.d_head * context * elem + 16 * c.d_vocab + 4 * c.d_mlp * elem
    if memory_budget is None:
        if model.device.type == "cuda":
            memory_budget = int(torch.cuda.mem_get_info(model.device)[0] * GPU_BUDGET_FRACTION)
        else:
            from hookedcot.interp.patching import _available_ram

            memory_budget = min(CPU_BUDGET, _available_ram() // 4)
    return max(1, int(memory_budget // per_row))


def sample_rollouts(
    model: "HookedCoT",
    prefix_tokens: Sequence[int] | Tensor,
    n: int,
    *,
    temperature: float = 0.6,
    top_p: float | None = 0.95,
    top_k: int | None = None,
    max_new_tokens: int = 1024,
    seed: int = 0,
    key: int | str | None = None,
    indices: Iterable[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    think: tuple[str, str] | None = THINK,
    memory_budget: int | None = None,
    fwd_hooks: Iterable = (),
    on_rollout: Callable[[Rollout], None] | None = None,
    progress: bool = True,
) -> list[Rollout]:
    """`n` rollouts of `prefix_tokens` (rollout indices 0..n-1, or the given `indices`), sorted by
    index. Seeds follow the module's rule, so indices 3..5 asked for later equal those of a call
    asking for 0..9. `on_rollout(r)` is called as each one finishes; `fwd_hooks` stay on for the
    prefix and every step (a finished row can leave the batch between steps)."""
    sampling = Sampling(temperature, top_p, top_k, max_new_tokens, tuple(stop_strings or ()), stop_at_eos, eos_token_id)
    ids = prefix_tokens.reshape(-1).tolist() if isinstance(prefix_tokens, Tensor) else prefix_tokens
    prefix = [int(t) for t in ids]
    key = prefix_key(prefix) if key is None else key
    wanted = list(range(n)) if indices is None else sorted(set(int(i) for i in indices))
    jobs = [(i, rollout_seed(seed, key, i)) for i in wanted]
    out: list[Rollout] = []
    with tqdm(total=len(jobs), desc="rollouts", disable=not progress, leave=False) as bar:
        def finished(r: Rollout) -> None:
            out.append(r)
            bar.update(1)
            if on_rollout is not None:
                on_rollout(r)

        for r in run_prefix(model, prefix, jobs, sampling, think=think, memory_budget=memory_budget,
                            fwd_hooks=fwd_hooks):
            finished(r)
    return sorted(out, key=lambda r: r.index)


@torch.inference_mode()
def run_prefix(
    model: "HookedCoT",
    prefix: list[int],
    jobs: Sequence[tuple[int, int]],
    sampling: Sampling,
    *,
    think: tuple[str, str] | None = THINK,
    memory_budget: int | None = None,
    fwd_hooks: Iterable = (),
    batches: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> Iterator[Rollout]:
    """The engine: rollouts (index, seed) of one prefix, yielded as they finish. The prefix runs
    once; the jobs are cut into balanced batches of at most `rows_per_batch` rows (`cut_batches`),
    or decoded in the `batches` given instead (a distributed rank's share of the batches one
    process would cut; `jobs` is then ignored). The caller's code between two yields runs inside
    the hooks of this call."""
    if not prefix:
        raise ValueError("a rollout needs a non-empty prefix (at least one token to continue from)")
    jobs = [job for batch in batches for job in batch] if batches is not None else jobs
    if not jobs:
        return
    dev = model.device
    with model.hooks(fwd_hooks):
        prefix_cache = KVCache(model.cfg, 1, len(prefix), model.dtype, dev)
        last = model(torch.tensor([prefix], device=dev), past_kv=prefix_cache, last_logits_only=True)[:, -1]
        if sampling.temperature == 0:  # every row is the greedy continuation: decode one, copy it
            (greedy,) = list(_decode(model, prefix_cache, last, [jobs[0]], sampling, think))
            for index, seed in jobs:
                yield Rollout(index, seed, list(greedy.tokens), greedy.text, greedy.answer, greedy.finish)
            return
        if batches is None:
            batches = cut_batches(jobs, rows_per_batch(model, sampling.max_new_tokens, memory_budget))  # prefix held once
        for batch in batches:
            yield from _decode(model, prefix_cache, last, batch, sampling, think)


def cut_batches(jobs: Sequence[Any], rows: int) -> list[list[Any]]:
    """`jobs` in consecutive batches of at most `rows`, as even as possible (10 jobs at 4 rows: 4, 4, 2)."""
    if not jobs:
        return []
    n_batches = -(-len(jobs) // rows)
    size = -(-len(jobs) // n_batches)
    return [list(jobs[lo : lo + size]) for lo in range(0, len(jobs), size)]


def _decode(model: "HookedCoT", prefix_cache: KVCache, last: Tensor, jobs: Sequence[tuple[int, int]],
            sampling: Sampling, think: tuple[str, str] | None) -> Iterator[Rollout]:
    """One batch: every row continues the prefix's cache (held once, not copied per row), then
    decode until every row is done."""
    from hookedcot.generate import _stop_ids

    dev, p, n_new = model.device, prefix_cache.length, sampling.max_new_tokens
    b = len(jobs)
    cache = SharedPrefixKVCache(prefix_cache, b, n_new)
    u = torch.stack([uniforms(seed, n_new) for _, seed in jobs]).to(dev)
    stops = set(_stop_ids(model, sampling.eos_token_ids)) if sampling.stop_at_eos else set()
    tok = model.tokenizer
    if sampling.stop_strings and tok is None:
        raise ValueError("stop_strings need the model's tokenizer; load the model with one or pass stop_strings=None")
    window = 1 + max((len(s.encode()) for s in sampling.stop_strings), default=0)
    live = list(range(b))  # batch row -> job
    generated: list[list[int]] = [[] for _ in jobs]
    done = [False] * b
    logits = last.expand(b, -1)
    for t in range(n_new):
        next_in = sample_tokens(logits, u[:, t], sampling)
        picks = next_in.tolist()
        for row, job in enumerate(live):
            if done[job]:
                continue
            generated[job].append(picks[row])
            finish = None
            if picks[row] in stops:
                finish = "eos"
            elif window > 1 and any(s in tok.decode(generated[job][-window:]) for s in sampling.stop_strings):
                finish = "stop"
            elif t + 1 == n_new:
                finish = "length"
            if finish is not None:
                done[job] = True
                yield _rollout(model, jobs[job], generated[job], finish, think)
        n_dead = sum(done[job] for job in live)
        if n_dead == len(live):
            return
        if n_dead >= max(1, COMPACT_FRACTION * len(live)):
            keep = [row for row, job in enumerate(live) if not done[job]]
            _compact(cache, keep)
            index = torch.tensor(keep, device=dev)
            u, next_in, live = u[index], next_in[index], [live[row] for row in keep]
        logits = model(next_in[:, None], past_kv=cache, last_logits_only=True)[:, -1]


def _compact(cache: SharedPrefixKVCache, keep: list[int]) -> None:
    """Move the kept rows (ascending) to the front of the batch in place, copying only the filled
    positions, and narrow the cache to them: no new buffer, nothing copied for rows that stay put
    (the shared prefix is no row's and stays where it is)."""
    filled = cache.length - cache.prefix_len
    for slot, row in enumerate(keep):
        if slot != row:  # slot < row: the row in `slot` has moved already or is done
            cache.keys[:, slot, :, :filled] = cache.keys[:, row, :, :filled]
            cache.values[:, slot, :, :filled] = cache.values[:, row, :, :filled]
    cache.keys, cache.values = cache.keys[:, : len(keep)], cache.values[:, : len(keep)]


def _rollout(model: "HookedCoT", job: tuple[int, int], tokens: list[int], finish: str,
             think: tuple[str, str] | None) -> Rollout:
    text_ids = tokens[:-1] if finish == "eos" else tokens
    text = model.tokenizer.decode(text_ids) if model.tokenizer is not None else ""
    return Rollout(job[0], job[1], list(tokens), text, rollout_answer(text, think), finish)
