"""Autoregressive decoding with a preallocated KV cache and live hooks.

The prompt is run once (hooks see every prompt position), then one position per step (hooks see
only the new position; `hook.positions` says where it is in the sequence). Left-padded batches,
greedy or seeded sampling (temperature, top-k, top-p), stop on eos or stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookedcot.fast_decode import FastStep, active_hooks, choose_path
from hookedcot.kv_cache import KVCache

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy decoding)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def pick_next(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Next token per row from last-position logits [b, vocab]."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > sampling.top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class GenerateOutput:
    """`generate(..., output_logits=True)`: what transformers' `GenerateDecoderOnlyOutput` holds and
    TransformerLens returns. `sequences` are token ids (prompt + new; only the new ones when the
    prompt came as embeddings); `logits[i]` [batch, d_vocab] chose new token i. Reads as
    `out.logits` or `out["logits"]`. `decode`: the path the steps ran ("eager", "static" or
    "compiled"; see fast_decode.py), since "auto" may choose differently for the same call."""

    sequences: Tensor
    logits: tuple[Tensor, ...]
    decode: str = "eager"

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class _Decoder:
    """The decoding loop as a generator of (step, next tokens [batch], logits [batch, d_vocab]),
    shared by `generate` and `generate_stream`. The caller holds the hook and kernel contexts (so a
    stream's consumer runs between steps without them). `new[:, :n]` holds the tokens chosen so
    far (pad for finished rows); `mask` covers prompt + new positions."""

    def __init__(self, model: "HookedCoT", tokens: Tensor | None, embeds: Tensor | None, mask: Tensor,
                 max_new_tokens: int, sampling: SamplingConfig, generator: torch.Generator | None,
                 stop_ids: list[int], pad_id: int, stop_strings: Sequence[str] | None, use_cache: bool,
                 freq_penalty: float, on_token: Callable[[int, Tensor], None] | None, verbose: bool,
                 fast: FastStep | None = None):
        self.model, self.tokens, self.embeds, self.sampling, self.generator = model, tokens, embeds, sampling, generator
        self.stop_ids, self.pad_id, self.stop_strings, self.on_token = stop_ids, pad_id, stop_strings, on_token
        self.freq_penalty, self.verbose, self.max_new_tokens = freq_penalty, verbose, max_new_tokens
        b, self.p0 = mask.shape
        device = model.device
        self.new = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.mask = torch.ones((b, self.p0 + max_new_tokens), dtype=torch.long, device=device)
        self.mask[:, : self.p0] = mask
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.n = 0
        self.fast = fast
        if fast is not None:
            self.cache = fast.cache
            fast.set_prompt_mask(mask)
        else:
            self.cache = KVCache(model.cfg, b, self.p0 + max_new_tokens, model.dtype, device) if use_cache else None
        self.counts = None
        if freq_penalty and sampling.do_sample:  # occurrences so far of each token, per row (TL's freq_penalty)
            self.counts = torch.zeros((b, model.cfg.d_vocab), device=device)
            if tokens is not None:
                self.counts.scatter_add_(1, tokens, mask.to(self.counts.dtype))

    def _forward(self, tokens: Tensor | None, embeds: Tensor | None, n: int) -> Tensor:
        if self.fast is not None and n > 0:  # one new position on the static cache
            return self.fast(tokens, self.p0 + n - 1, self.mask[:, self.p0 + n - 1].bool())
        mask = self.mask[:, : self.p0 + n]
        kw = dict(attention_mask=mask, past_kv=self.cache, last_logits_only=True)
        if embeds is not None:
            run = lambda: self.model(inputs_embeds=embeds, **kw)[:, -1]  # noqa: E731
        else:
            run = lambda: self.model(tokens, **kw)[:, -1]  # noqa: E731
        return self.fast.prefill(run) if self.fast is not None else run()

    def steps(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        logits = self._forward(self.tokens, self.embeds, 0)
        stop_tensor = torch.tensor(self.stop_ids, device=self.new.device, dtype=torch.long)
        for step in tqdm(range(self.max_new_tokens), disable=not self.verbose, desc="generating", leave=False):
            scores = logits
            if self.counts is not None:  # after the temperature division in pick_next: logits/T - penalty * count
                scores = logits.float() - self.freq_penalty * self.sampling.temperature * self.counts
            next_tokens = pick_next(scores, self.sampling, self.generator)
            next_tokens = torch.where(self.finished, torch.full_like(next_tokens, self.pad_id), next_tokens)
            self.new[:, step] = next_tokens
            self.mask[:, self.p0 + step] = (~self.finished).long()
            self.n = step + 1
            if self.counts is not None:
                self.counts.scatter_add_(1, next_tokens[:, None], (~self.finished).to(self.counts.dtype)[:, None])
            if self.on_token is not None:
                self.on_token(step, next_tokens)
            if len(self.stop_ids):
                self.finished |= torch.isin(next_tokens, stop_tensor)
            if self.stop_strings:
                self.finished |= _hit_stop_string(self.model, self.new[:, : self.n], self.stop_strings)
            yield step, next_tokens, logits
            if bool(self.finished.all()) or self.n == self.max_new_tokens:
                return
            new = self.new[:, : self.n]
            if self.cache is not None:
                logits = self._forward(next_tokens[:, None], None, self.n)
            elif self.embeds is not None:
                logits = self._forward(None, torch.cat([self.embeds, self.model.embed(new).to(self.embeds.dtype)], 1), self.n)
            else:
                logits = self._forward(torch.cat([self.tokens, new], 1), None, self.n)

    def sequences(self) -> Tensor:
        """Token ids: prompt + new, or only the new ones when the prompt came as embeddings."""
        new = self.new[:, : self.n]
        return new if self.tokens is None else torch.cat([self.tokens, new], 1)


def _start(model: "HookedCoT", input: Any, max_new_tokens: int, attention_mask: Tensor | None, do_sample: bool,
           temperature: float, top_k: int | None, top_p: float | None, freq_penalty: float, seed: int | None,
           stop_at_eos: bool, eos_token_id: int | Sequence[int] | None, stop_strings: Sequence[str] | None,
           use_cache: bool | None, use_past_kv_cache: bool | None, prepend_bos: bool | None, padding_side: str | None,
           on_token: Callable[[int, Tensor], None] | None, verbose: bool, decode: str = "auto") -> tuple[_Decoder, str]:
    """Checks the options and prepares the prompt; -> (decoder, kind of input: 'str' | 'tokens' | 'embeds').
    Run it with the generation's hooks active: they decide the decode path (`fast_decode.choose_path`)."""
    if use_cache is not None and use_past_kv_cache is not None and use_cache != use_past_kv_cache:
        raise ValueError(f"use_cache={use_cache} and use_past_kv_cache={use_past_kv_cache} disagree; they are one "
                         "option under two names (use_past_kv_cache is TransformerLens')")
    use_cache = next((v for v in (use_cache, use_past_kv_cache) if v is not None), True)
    if temperature == 0:  # TransformerLens' spelling of greedy decoding
        do_sample = False
    sampling = SamplingConfig(do_sample, temperature if temperature else 1.0, top_k, top_p)
    sampling.validate()
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokens = embeds = None
    if _is_text(input):
        kind = "str"
        # left-padded whatever padding_side says (TransformerLens forces left for batches too):
        # every row's next token is then read at the last position
        tokens, mask = model._require_tokenizer().tokenize(input, prepend_bos=model._prepend_bos(prepend_bos))
        tokens, mask = tokens.to(model.device), mask.to(model.device)
    elif isinstance(input, Tensor) and input.is_floating_point():
        kind = "embeds"
        if input.dim() != 3 or input.shape[-1] != model.cfg.d_model:
            raise ValueError(f"embeddings must be [batch, pos, {model.cfg.d_model}], got {tuple(input.shape)}")
        embeds = input.to(model.device, model.dtype)
        mask = attention_mask.to(model.device) if attention_mask is not None else torch.ones(
            embeds.shape[:2], dtype=torch.long, device=model.device)
    elif isinstance(input, Tensor):
        kind = "tokens"
        tokens = (input[None] if input.dim() == 1 else input).to(model.device)
        mask = attention_mask.to(model.device) if attention_mask is not None else torch.ones_like(tokens)
    else:
        raise TypeError(f"input must be a string, a list of strings, token ids or embeddings, got {type(input).__name__}")
    stop_ids = _stop_ids(model, eos_token_id) if stop_at_eos else []
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    active = active_hooks(model)
    b, capacity = mask.shape[0], mask.shape[1] + max_new_tokens
    path = choose_path(decode, model, active, use_cache, b, capacity, max_new_tokens)
    fast = FastStep(model, b, capacity, active, compiled=path == "compiled", fallback=decode == "auto") \
        if path != "eager" else None
    decoder = _Decoder(model, tokens, embeds, mask, max_new_tokens, sampling, generator, stop_ids,
                       _pad_id(model, stop_ids), stop_strings, use_cache, freq_penalty, on_token, verbose, fast)
    return decoder, kind


@torch.inference_mode()
def generate(
    model: "HookedCoT",
    input: str | Sequence[str] | Tensor,
    max_new_tokens: int = 64,
    *,
    attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    freq_penalty: float = 0.0,
    seed: int | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    fwd_hooks: Iterable = (),
    use_cache: bool | None = None,
    use_past_kv_cache: bool | None = None,
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
    on_token: Callable[[int, Tensor], None] | None = None,
    verbose: bool = False,
    return_type: str = "input",
    output_logits: bool = False,
    return_dict_in_generate: bool | None = None,
    decode: str = "auto",
) -> Any:
    """Generate up to `max_new_tokens` per row; see `HookedCoT.generate`.

    `input`: a string, a list of strings (left-padded), token ids [batch, pos] / [pos], or
    embeddings [batch, pos, d_model] (float). `return_type`: "input" (what came in), "str", "tokens"
    or "embeds" (the model's token embeddings of the whole sequence; for embeddings in, those
    followed by the new tokens' embeddings). From embeddings, "tokens" and "str" hold only the new
    tokens, as in TransformerLens. `output_logits=True` returns a `GenerateOutput` (sequences and
    each step's logits) instead. TransformerLens' names are accepted: `use_past_kv_cache` (=
    `use_cache`), `freq_penalty`, `temperature=0` (greedy), `prepend_bos`, `padding_side` (text
    batches are always left-padded), `return_dict_in_generate` (ignored, as in TL).

    `decode`: "auto" (default), "eager", "static" or "compiled" — see `hookedcot.fast_decode`.
    When every active hook is a declarative intervention (`hookedcot.interp.interventions`; the
    steering and ablation builders return them), decoding runs on a static KV cache with the
    interventions inside the step; a Python hook makes "auto" run the eager loop, with a
    `FastPathNotice` naming the hook."""
    if return_type not in ("input", "str", "tokens", "embeds"):
        raise ValueError(f"return_type must be 'input', 'str', 'tokens' or 'embeds', got {return_type!r}")
    step_logits = []
    with model.hooks(fwd_hooks):
        decoder, kind = _start(model, input, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                               freq_penalty, seed, stop_at_eos, eos_token_id, stop_strings, use_cache,
                               use_past_kv_cache, prepend_bos, padding_side, on_token, verbose, decode)
        for _, _, logits in decoder.steps():
            if output_logits:
                step_logits.append(logits.clone())
    sequences = decoder.sequences()
    if output_logits:
        path = "eager" if decoder.fast is None else "compiled" if decoder.fast.compiled else "static"
        return GenerateOutput(sequences, tuple(step_logits), path)
    kind_out = kind if return_type == "input" else return_type
    if kind_out == "tokens":
        return sequences
    if kind_out == "embeds":
        new_embeds = model.embed(decoder.new[:, : decoder.n])
        if decoder.embeds is not None:
            return torch.cat([decoder.embeds, new_embeds.to(decoder.embeds.dtype)], 1)
        return model.embed(sequences)
    texts = _texts(model, decoder)
    one = isinstance(input, str) or (isinstance(input, Tensor) and len(texts) == 1)  # TL: one row -> one str
    return texts[0] if one else texts


@torch.inference_mode()
def generate_stream(
    model: "HookedCoT",
    input: str | Sequence[str] | Tensor,
    max_new_tokens: int = 10,
    max_tokens_per_yield: int = 25,
    *,
    fwd_hooks: Iterable = (),
    return_type: str = "input",
    **kwargs: Any,
) -> Iterator[Tensor | str | list[str]]:
    """TransformerLens' `generate_stream`: the tokens as they are chosen, in chunks of at most
    `max_tokens_per_yield` new tokens ([batch, k] ids). The first chunk starts with the prompt's
    ids (TL's habit; not for embeddings in). `return_type="str"` yields text instead: for each
    chunk, the text it adds, the prompt's text first (a string for a string in, else a list per
    row). The other options are
    `generate`'s; hooks are active only while a step runs, not while you hold a
    chunk. It decodes on the eager path: hooks may change between chunks, which a step built
    once from the hooks of the call could not follow."""
    if max_tokens_per_yield < 1:
        raise ValueError("max_tokens_per_yield must be >= 1")
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"generate_stream's return_type must be 'input', 'tokens' or 'str', got {return_type!r}")
    options = {k: kwargs.pop(k, None) for k in ("attention_mask", "top_k", "top_p", "seed", "eos_token_id",
                                                  "stop_strings", "use_cache", "use_past_kv_cache", "prepend_bos",
                                                  "padding_side", "on_token")}
    decoder, kind = _start(model, input, max_new_tokens, options["attention_mask"], kwargs.pop("do_sample", False),
                           kwargs.pop("temperature", 1.0), options["top_k"], options["top_p"],
                           kwargs.pop("freq_penalty", 0.0), options["seed"], kwargs.pop("stop_at_eos", True),
                           options["eos_token_id"], options["stop_strings"], options["use_cache"],
                           options["use_past_kv_cache"], options["prepend_bos"], options["padding_side"],
                           options["on_token"], kwargs.pop("verbose", False), "eager")
    if kwargs:
        raise TypeError(f"generate_stream got unexpected options {sorted(kwargs)}")
    steps, sent, shown = decoder.steps(), 0, [""] * decoder.new.shape[0]
    while True:
        with model.hooks(fwd_hooks):
            done = next(steps, None) is None
        if (done and decoder.n > sent) or decoder.n - sent >= max_tokens_per_yield:
            chunk = decoder.new[:, sent : decoder.n]
            if sent == 0 and decoder.tokens is not None:
                chunk = torch.cat([decoder.tokens, chunk], 1)
            sent = decoder.n
            if return_type != "str":
                yield chunk.clone()
            else:
                texts = _texts(model, decoder)
                if not done:  # a character cut between tokens reads U+FFFD until its last byte comes
                    texts = [t.rstrip("\ufffd") for t in texts]
                pieces, shown = [t[len(s):] for t, s in zip(texts, shown)], texts
                yield pieces[0] if isinstance(input, str) else pieces
        if done:
            return


def _texts(model: "HookedCoT", decoder: _Decoder) -> list[str]:
    """Each row's `sequences()` as text, padding left out."""
    sequences = decoder.sequences()
    mask = decoder.mask[:, decoder.p0 + decoder.n - sequences.shape[1] : decoder.p0 + decoder.n]
    tok = model._require_tokenizer()
    return [tok.decode([t for t, m in zip(row.tolist(), mrow.tolist()) if m]) for row, mrow in zip(sequences, mask)]


def _is_text(input: Any) -> bool:
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and len(input) > 0 and isinstance(input[0], str))


def _stop_ids(model: "HookedCoT", eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    tok = model.tokenizer
    if tok is not None and getattr(tok, "eos_token_ids", None):
        return list(tok.eos_token_ids)
    eos = model.cfg.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _pad_id(model: "HookedCoT", stop_ids: list[int]) -> int:
    tok = model.tokenizer
    if tok is not None and getattr(tok, "pad_token_id", None) is not None:
        return tok.pad_token_id
    if model.cfg.pad_token_id is not None:
        return model.cfg.pad_token_id
    return stop_ids[0] if stop_ids else 0


def _hit_stop_string(model: "HookedCoT", generated: Tensor, stop_strings: Sequence[str]) -> Tensor:
    tok = model._require_tokenizer()
    hits = [any(s in tok.decode(row.tolist()) for s in stop_strings) for row in generated]
    return torch.tensor(hits, device=generated.device)
