"""An activation store: chosen hooks of one model, or of two models on exactly the same tokens,
streamed to disk in safetensors shards and read back as shuffled minibatches.

Collecting (`collect_activations(models, texts, hook_names, out)`): the texts are tokenized once
(by the first model's tokenizer; a second model must have the same vocabulary, or the call names
the ids that differ), grouped into batches of similar length, and every model runs each batch
with hooks that keep only the requested activations, stopping after the deepest hooked block (no
unembedding). Rows are left padded; padding is never stored. Every `shard_tokens` tokens a shard
is written with, per token, the activations of each (model, hook) and the token id, position and
sequence index; then `store.json` is rewritten (atomically) with the shard list and running
normalisation statistics. An interrupted collection resumes where its last shard ended when
called again with the same arguments; different models, texts or hooks refuse the old folder.

Layout of `out/`:
- `store.json`: format, models (name, n_layers, d_model), hooks, storage dtype, fingerprint of the
  data and models, shards (file, tokens, batches covered), per (model, hook) statistics
  (`count`, `sum` [d], `sum_sq` [d], `sum_norm`);
- `tokens.safetensors`: `ids` (every sequence's tokens, concatenated) and `offsets` [n_seq + 1];
- `shard_00000.safetensors`, ...: `acts.{model}.{hook}` [n, d], `tokens`, `positions`, `sequences` [n].

Reading (`ActivationStore(out).batches(hook, batch_size)`): shards are visited in a seeded random
order, `mix` of them at a time are pooled and permuted, so memory holds `mix` shards, never the store.
`scale(hook)` is the factor per model that brings the mean activation norm to sqrt(d) (the
normalisation crosscoders are trained with).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.dictionaries.files import DictionaryFileError, DictionaryFileNotFoundError, read_json_object
from hookedcot.dictionaries.store_check import _check_batch, _check_manifest, _check_tokens
from hookedcot.generate import _stop_ids
from hookedcot.hook_names import stop_layer

FORMAT = "hookedcot-activation-store/1"
MANIFEST, TOKENS = "store.json", "tokens.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ActivationBatch:
    """`acts` [B, n_models, d]; per row its token id, position in its sequence and sequence index."""

    acts: Tensor
    tokens: Tensor
    positions: Tensor
    sequences: Tensor


# ---------------------------------------------------------------------------------------- collecting
def collect_activations(
    models: Any,
    texts: Sequence[str] | Sequence[Sequence[int]] | Sequence[Tensor],
    hook_names: str | Sequence[str],
    out: str | Path,
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    shard_tokens: int = 65536,
    dtype: str | torch.dtype = "float32",
    skip_first: int = 1,
    prepend_bos: bool | None = None,
    progress: bool = True,
    records: Callable[[int], dict[str, Tensor]] | None = None,
) -> "ActivationStore":
    """Record `hook_names` of `models` (one model, a sequence, or {name: model}; unnamed models are
    "model", or "base" and "child" for two) over `texts` (strings, or token id lists run as they
    are) into the folder `out` (module docstring). `skip_first` drops each sequence's first
    positions (default 1: the attention-sink position, whose norm dwarfs the rest).
    `records(b)`: batch b's rows as `batch_records` gives them, computed elsewhere (the ranks of
    `hookedcot.distributed.collect_activations`); None runs the models here.
    Returns the store, also when everything was already collected."""
    named = _named_models(models)
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ValueError("no hook names given: pass e.g. hook_names='blocks.12.hook_resid_post'")
    first = next(iter(named.values()))
    for model in named.values():
        model.cache_names(names)  # a wrong name raises here, listing the nearest valid ones
    _check_same_tokenizer(named)
    storage = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if storage not in DTYPES.values():
        raise ValueError(f"storage dtype {dtype!r} unsupported; use one of {list(DTYPES)}")
    sequences = _tokenize(first, texts, max_length, prepend_bos)
    if not sequences:
        raise ValueError("no texts to collect activations over")
    if skip_first < 0 or all(len(s) <= skip_first for s in sequences):
        raise ValueError(f"skip_first={skip_first} leaves no tokens to store (longest sequence: "
                         f"{max(len(s) for s in sequences)} tokens); lower skip_first or give longer texts")
    plan = _batch_plan(sequences, batch_size)
    out = Path(out)
    fingerprint = _fingerprint(named, names, sequences, plan, storage, skip_first)
    manifest = _start_or_resume(out, fingerprint, named, names, sequences, storage, skip_first, len(plan))
    done = sum(s["batches"][1] - s["batches"][0] for s in manifest["shards"])
    stop = stop_layer(names, first.cfg.n_layers)
    buffer: dict[str, list[Tensor]] = {}
    buffered_from, buffered = done, 0
    with tqdm(total=len(plan), initial=done, desc="activations", disable=not progress, leave=False) as bar:
        for b in range(done, len(plan)):
            rows = records(b) if records is not None else batch_records(named, sequences, plan[b], names, stop,
                                                                        skip_first, storage)
            for key, value in rows.items():
                buffer.setdefault(key, []).append(value)
            buffered += int(rows["tokens"].numel())
            bar.update(1)
            if buffered >= shard_tokens or b == len(plan) - 1:
                _write_shard(out, manifest, buffer, (buffered_from, b + 1), named, names)
                buffer, buffered_from, buffered = {}, b + 1, 0
    return ActivationStore(out)


def batch_records(named: dict[str, Any], sequences: list[list[int]], rows: list[int], names: list[str],
                  stop: int | None, skip_first: int, storage: torch.dtype) -> dict[str, Tensor]:
    """One batch of the plan (`rows`: sequence indices) run through every model: per kept token,
    `acts.{model}.{hook}` [n, d] in the storage dtype, and its `tokens`, `positions`, `sequences`."""
    tokens, mask = _left_pad([sequences[i] for i in rows], _pad_id(next(iter(named.values()))))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    keep = mask.bool() & (pos >= skip_first)
    out = {}
    for model_name, model in named.items():
        acts = _run(model, tokens, mask, names, stop)
        for hook in names:
            out[f"acts.{model_name}.{hook}"] = _per_token(acts[hook], hook, tokens.shape)[keep].to(storage)
    seq_ids = torch.as_tensor(rows)[:, None].expand_as(tokens)
    return out | {"tokens": tokens[keep], "positions": pos[keep], "sequences": seq_ids[keep]}


def _named_models(models: Any) -> dict[str, Any]:
    if isinstance(models, Mapping):
        named = dict(models)
    elif isinstance(models, (list, tuple)):
        default = ["base", "child"] if len(models) == 2 else [f"model{i}" for i in range(len(models))]
        named = dict(zip(default, models))
    else:
        named = {"model": models}
    if not named:
        raise ValueError("no models given")
    bad = [n for n in named if not n or "." in n or "/" in n]
    if bad:
        raise ValueError(f"model names {bad} cannot name tensors: use names without '.' or '/'")
    return named


def _check_same_tokenizer(named: dict[str, Any]) -> None:
    """Two models read the same token ids only if their vocabularies agree id by id."""
    (first_name, first), *rest = named.items()
    for name, model in rest:
        if model.cfg.d_vocab != first.cfg.d_vocab:
            raise ValueError(f"'{first_name}' has a vocabulary of {first.cfg.d_vocab} ids and '{name}' of "
                             f"{model.cfg.d_vocab}: their activations cannot be recorded on the same tokens")
        a, b = _vocab(first), _vocab(model)
        if a is None or b is None:
            continue  # token ids given directly; nothing to compare but the size
        differ = sorted(i for i in set(a) | set(b) if a.get(i) != b.get(i))
        if differ:
            shown = ", ".join(f"{i}: {a.get(i)!r} vs {b.get(i)!r}" for i in differ[:8])
            raise ValueError(f"'{first_name}' and '{name}' have different tokenizers: {len(differ)} ids differ "
                             f"({shown}{', ...' if len(differ) > 8 else ''}); a crosscoder needs two models that "
                             "share a tokenizer (e.g. a base model and its fine-tune)")


def _vocab(model: Any) -> dict[int, str] | None:
    backend = getattr(getattr(model, "tokenizer", None), "backend", None)
    if backend is None:
        return None
    return {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}


def _tokenize(model: Any, texts: Sequence[Any], max_length: int | None, prepend_bos: bool | None) -> list[list[int]]:
    out = []
    for text in texts:
        if isinstance(text, str):
            if getattr(model, "tokenizer", None) is None:
                raise ValueError("the model has no tokenizer: pass token id lists instead of strings")
            ids = model.tokenizer.tokenize(text, prepend_bos=prepend_bos)[0][0].tolist()
        else:
            ids = torch.as_tensor(text).flatten().tolist()
        out.append([int(i) for i in ids[:max_length]])
    return out


def _batch_plan(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    """Sequence indices per batch, longest first, so rows of a batch have similar lengths."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    n = max(len(r) for r in rows)
    tokens = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r):] = 1
    return tokens, mask


@torch.inference_mode()
def _run(model: Any, tokens: Tensor, mask: Tensor, names: list[str], stop: int | None) -> dict[str, Tensor]:
    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> None:
        kept[hook.name] = x.detach().float().cpu()

    device = model.device
    with model.hooks([(n, keep) for n in names]):
        model(tokens.to(device), attention_mask=mask.to(device), return_type=None, stop_at_layer=stop)
    return kept


def _per_token(x: Tensor, hook: str, shape: torch.Size) -> Tensor:
    """[batch, pos, ...] -> [batch, pos, features] (heads flattened); refuse hooks not per token."""
    if tuple(x.shape[:2]) != tuple(shape):
        raise ValueError(f"{hook} gives {tuple(x.shape)}, not one vector per token [batch, pos, ...]; "
                         "a store records per-token hooks (resid, attn_out, mlp_out, hook_z, mlp.hook_post, ...)")
    return x.reshape(*shape, -1)


def _fingerprint(named: dict[str, Any], names: list[str], sequences: list[list[int]], plan: list[list[int]],
                 storage: torch.dtype, skip_first: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"models": {n: _model_id(m) for n, m in named.items()}, "hooks": names,
                         "plan": plan, "dtype": str(storage), "skip_first": skip_first}).encode())
    for s in sequences:
        h.update(json.dumps(s).encode())
    return h.hexdigest()[:24]


def _model_id(model: Any) -> dict[str, Any]:
    """Enough of a model to refuse resuming with another one: its shape and a weight checksum."""
    cfg = model.cfg
    h = hashlib.sha256()
    for p in model.parameters():  # a strided sample of every tensor: a fine-tune of any layer shows
        flat = p.detach().flatten()
        h.update(flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return {"name": getattr(cfg, "model_name", ""), "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "checksum": h.hexdigest()[:24]}


def _start_or_resume(out: Path, fingerprint: str, named: dict[str, Any], names: list[str],
                     sequences: list[list[int]], storage: torch.dtype, skip_first: int, n_batches: int) -> dict[str, Any]:
    path = out / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            raise ValueError(f"{out} holds another collection (other models, texts, hooks or settings); "
                             "choose a new folder or delete this one")
        return manifest
    leftovers = {f.name for f in out.iterdir()} if out.exists() else set()
    if leftovers - {TOKENS, TOKENS + ".tmp"}:  # a start that died before its manifest leaves only these
        raise ValueError(f"{out} exists and is not an activation store; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    lengths = torch.tensor([0] + [len(s) for s in sequences]).cumsum(0)
    save_file({"ids": torch.tensor([i for s in sequences for i in s], dtype=torch.long), "offsets": lengths},
              out / (TOKENS + ".tmp"))
    os.replace(out / (TOKENS + ".tmp"), out / TOKENS)
    manifest = {"format": FORMAT, "fingerprint": fingerprint,
                "models": {n: _model_id(m) for n, m in named.items()}, "hooks": names, "d": {},
                "dtype": str(storage).removeprefix("torch."), "skip_first": skip_first,
                "n_sequences": len(sequences), "n_batches": n_batches, "shards": [], "stats": {}}
    _write_json(path, manifest)
    return manifest


def _write_shard(out: Path, manifest: dict[str, Any], buffer: dict[str, list[Tensor]], batches: tuple[int, int],
                 named: dict[str, Any], names: list[str]) -> None:
    tensors = {k: torch.cat(v).contiguous() for k, v in buffer.items()}
    n = int(tensors["tokens"].numel())
    file = f"shard_{len(manifest['shards']):05d}.safetensors"
    tmp = out / (file + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, out / file)
    for model_name in named:
        for hook in names:
            x = tensors[f"acts.{model_name}.{hook}"].double()
            key = f"{model_name}.{hook}"
            manifest["d"][hook] = x.shape[1]
            stat = manifest["stats"].setdefault(key, {"count": 0, "sum": [0.0] * x.shape[1],
                                                      "sum_sq": [0.0] * x.shape[1], "sum_norm": 0.0})
            stat["count"] += n
            stat["sum"] = (torch.tensor(stat["sum"], dtype=torch.float64) + x.sum(0)).tolist()
            stat["sum_sq"] = (torch.tensor(stat["sum_sq"], dtype=torch.float64) + (x * x).sum(0)).tolist()
            stat["sum_norm"] += float(x.norm(dim=1).sum())
    manifest["shards"].append({"file": file, "n_tokens": n, "batches": list(batches)})
    _write_json(out / MANIFEST, manifest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ reading
class ActivationStore:
    """A collected store, read shard by shard (module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise DictionaryFileNotFoundError(f"{self.path} has no {MANIFEST}: it is not an activation store "
                                              "(make one with hookedcot.dictionaries.collect_activations)")
        self.manifest = read_json_object(manifest_path)
        if self.manifest.get("format") != FORMAT:
            raise DictionaryFileError(f"{manifest_path} has format {self.manifest.get('format')!r}; this reader "
                                      f"knows {FORMAT!r}")
        self.models, self.hook_names, self.shards = _check_manifest(self.path, self.manifest)
        self.n_tokens: int = sum(s["n_tokens"] for s in self.shards)
        self._tokens: dict[str, Tensor] | None = None

    @property
    def complete(self) -> bool:
        """Whether every batch of the collection was written (False after an interruption)."""
        covered = self.shards[-1]["batches"][1] if self.shards else 0
        return covered == self.manifest["n_batches"]

    def d(self, hook_name: str) -> int:
        return int(self.manifest["d"][self._hook(hook_name)])

    def _hook(self, hook_name: str) -> str:
        if hook_name not in self.hook_names:
            raise KeyError(f"the store at {self.path} holds {self.hook_names}, not {hook_name!r}")
        return hook_name

    def _models(self, models: Sequence[str] | None) -> list[str]:
        chosen = list(models) if models is not None else self.models
        unknown = [m for m in chosen if m not in self.models]
        if unknown:
            raise KeyError(f"the store holds models {self.models}, not {unknown}")
        return chosen

    def stats(self, hook_name: str, models: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per model: `mean` [d], `std` [d] and `mean_norm` of the stored activations."""
        out = {}
        for m in self._models(models):
            s = self.manifest["stats"][f"{m}.{self._hook(hook_name)}"]
            n = s["count"]
            mean = torch.tensor(s["sum"], dtype=torch.float64) / n
            var = (torch.tensor(s["sum_sq"], dtype=torch.float64) / n - mean**2).clamp(min=0)
            out[m] = {"mean": mean.float(), "std": var.sqrt().float(), "mean_norm": s["sum_norm"] / n, "count": n}
        return out

    def scale(self, hook_name: str, models: Sequence[str] | None = None) -> Tensor:
        """[n_models]: multiply a model's activations by it and their mean norm becomes sqrt(d)."""
        stats = self.stats(hook_name, models)
        return torch.tensor([math.sqrt(self.d(hook_name)) / stats[m]["mean_norm"] for m in stats])

    def sequence_tokens(self, seq: int) -> Tensor:
        """The token ids of sequence `seq` (as collected, before `skip_first`)."""
        if self._tokens is None:
            self._tokens = _check_tokens(self.path / TOKENS, self.manifest)
        offsets = self._tokens["offsets"]
        if not 0 <= seq < len(offsets) - 1:
            raise IndexError(f"sequence {seq} out of range: the store holds {len(offsets) - 1} sequences")
        return self._tokens["ids"][int(offsets[seq]) : int(offsets[seq + 1])]

    def load_shard(self, index: int, hook_name: str, models: Sequence[str] | None = None) -> ActivationBatch:
        """One whole shard: acts [n, n_models, d] (float32) and its token ids, positions, sequences."""
        chosen, hook = self._models(models), self._hook(hook_name)
        file = self.path / self.shards[index]["file"]
        try:
            with safe_open(file, framework="pt") as f:
                acts = torch.stack([f.get_tensor(f"acts.{m}.{hook}").float() for m in chosen], dim=1)
                batch = ActivationBatch(acts, f.get_tensor("tokens"), f.get_tensor("positions"), f.get_tensor("sequences"))
        except Exception as exc:  # noqa: BLE001 - the parser's errors (a shard changed since the store was opened)
            raise DictionaryFileError(f"{file} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); the store is "
                                      "damaged: collect it again") from None
        _check_batch(file, batch, self.manifest["n_sequences"])
        return batch

    def batches(self, hook_name: str, batch_size: int, *, shuffle: bool = True, seed: int = 0, epochs: int | None = 1,
                models: Sequence[str] | None = None, normalize: bool = False, mix: int = 2,
                drop_last: bool = False) -> Iterator[ActivationBatch]:
        """Minibatches of `batch_size` tokens. Shuffled: each epoch visits the shards in a seeded
        order, pooling `mix` shards at a time and permuting the pool; memory holds about `mix` shards
        (the pool and the batch being served). An epoch ends with its remainder, a shorter batch
        (dropped with `drop_last`), so every token comes once per epoch. `epochs=None` repeats
        forever. `normalize` multiplies by `scale(hook_name)`."""
        if not self.shards:
            raise ValueError(f"the store at {self.path} holds no shards yet")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of tokens, got {batch_size}")
        chosen = self._models(models)
        factor = self.scale(hook_name, chosen)[None, :, None] if normalize else None
        g = torch.Generator().manual_seed(seed)
        epoch = 0
        carry: ActivationBatch | None = None
        while epochs is None or epoch < epochs:
            order = torch.randperm(len(self.shards), generator=g).tolist() if shuffle else list(range(len(self.shards)))
            step = max(1, mix) if shuffle else 1
            for lo in range(0, len(order), step):
                parts = [self.load_shard(i, hook_name, chosen) for i in order[lo : lo + step]]
                if carry is not None:
                    parts.insert(0, carry)
                pool = _cat(parts)
                del parts  # the pool is the only copy held while it is served
                if shuffle:
                    pool = _take(pool, torch.randperm(len(pool.tokens), generator=g))
                n = len(pool.tokens)
                full = n - n % batch_size
                for i in range(0, full, batch_size):
                    batch = _take(pool, slice(i, i + batch_size))
                    if factor is not None:
                        batch.acts = batch.acts * factor
                    yield batch
                carry = _take(pool, slice(full, n)) if full < n else None
            epoch += 1
            if carry is not None and not drop_last:  # each epoch ends with its remainder, never mixed into the next
                if factor is not None:
                    carry.acts = carry.acts * factor
                yield carry
            carry = None

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, models {self.models}, hooks {self.hook_names}, "
                f"{self.n_tokens} tokens in {len(self.shards)} shards)")


def _cat(parts: list[ActivationBatch]) -> ActivationBatch:
    if len(parts) == 1:
        return parts[0]
    return ActivationBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("acts", "tokens", "positions", "sequences")))


def _take(b: ActivationBatch, index: Any) -> ActivationBatch:
    return ActivationBatch(b.acts[index], b.tokens[index], b.positions[index], b.sequences[index])


# ---------------------------------------------------------------------------------------- generations
def generations(model: Any, prompts: Sequence[str], max_new_tokens: int = 128, *, chat: bool = True,
                batch_size: int = 8, progress: bool = True, **generate_kwargs: Any) -> list[list[int]]:
    """Each prompt (through the chat template when `chat`) with the model's own completion, as token
    id lists without padding, ready for `collect_activations`: activations over what a model
    writes, e.g. its chains of thought. `generate_kwargs` go to `model.generate` (do_sample, seed, ...)."""
    if generate_kwargs.get("stop_strings"):
        raise ValueError("generations() cuts completions at stop tokens only; generate with stop_strings yourself "
                         "and pass the cut token ids to collect_activations")
    texts = [model.apply_chat_template([{"role": "user", "content": p}]) if chat else p for p in prompts]
    stops = set() if generate_kwargs.get("stop_at_eos") is False else set(_stop_ids(model, generate_kwargs.get("eos_token_id")))
    out: list[list[int]] = []
    for lo in tqdm(range(0, len(texts), batch_size), desc="generating", disable=not progress, leave=False):
        tokens, mask = model.tokenize(texts[lo : lo + batch_size])
        rows = model.generate(tokens, max_new_tokens, attention_mask=mask, return_type="tokens", **generate_kwargs)
        p0 = tokens.shape[1]
        for row, m in zip(rows.tolist(), mask.tolist()):
            prompt = [t for t, keep in zip(row[:p0], m) if keep]
            completion = row[p0:]
            end = next((i + 1 for i, t in enumerate(completion) if t in stops), len(completion))
            out.append(prompt + completion[:end])
    return out
