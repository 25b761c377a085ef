"""Text <-> token ids, chat templates and position helpers, on top of a `tokenizers.Tokenizer`.

Two sources: an HF folder's `tokenizer.json` (used as shipped) or a GGUF file's metadata, from
which we build the same tokenizer transformers builds for that file (`AutoTokenizer.from_pretrained
(dir, gguf_file=...)`), so that prompts tokenize identically in hookedcot and transformers. No code
from a checkpoint is ever run: `tokenizer_config.json` is read as data and chat templates render
in jinja2's immutable sandbox, as in transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from hookedcot.chat_template import ChatTemplateError, render_chat_template
from hookedcot.errors import HookedCoTError


class TokenizerError(HookedCoTError, ValueError):
    """A tokenizer cannot be built, or a request (single token, substring position) cannot be met."""


class NoTokenizerError(TokenizerError, AssertionError):
    """Text was given to a model without a tokenizer (an AssertionError too, as TransformerLens raises)."""


class TokenNotFoundError(TokenizerError, AssertionError):
    """`get_token_position` found no such token; also an AssertionError, which TransformerLens raises."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


_BYTE_CHARS = bytes_to_unicode()
_CHAR_BYTES = {c: b for b, c in _BYTE_CHARS.items()}

# tokenizer.ggml.pre -> split regex, as transformers maps them (integrations/gguf/gguf_tokenizer_mapping.py).
# Any other value keeps GPT-2's own ByteLevel regex, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
         "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's special ids and chat template.

    `add_bos` says whether `encode(text)` starts with BOS, which is whatever the source's
    post-processor does (SmolLM2 and Qwen2: no; LLaMA-3: yes). `vocab_size` counts added tokens."""

    def __init__(
        self,
        backend: Backend,
        special_tokens: Mapping[str, str | None],
        eos_token_ids: Sequence[int] = (),
        chat_template: str | dict[str, str] | None = None,
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        ids = {k: backend.token_to_id(v) for k, v in self.special_tokens.items()}
        self.bos_token_id: int | None = ids.get("bos_token")
        self.eos_token_id: int | None = ids.get("eos_token")
        stops = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(eos_token_ids)
        self.eos_token_ids: list[int] = list(dict.fromkeys(stops))
        pad = ids.get("pad_token")
        self.pad_token_id: int | None = pad if pad is not None else self.eos_token_id
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        probe = backend.encode("a", add_special_tokens=True).ids
        self._encode_adds_bos = self.bos_token_id is not None and len(probe) > 1 and probe[0] == self.bos_token_id
        self.add_bos: bool = self._encode_adds_bos  # what `tokenize(prepend_bos=None)` does; settable
        decoder = backend.decoder.__getstate__() if backend.decoder is not None else b""
        self._byte_level = b'"ByteLevel"' in decoder  # token strings are bytes in GPT-2's alphabet
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.padding_side: str = "left"  # the HF surface (`__call__`, `to_tokens`); `tokenize` pads left unless told
        self.truncation_side: str = "right"
        self.name_or_path: str = ""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_transformers(cls, hf_tokenizer: Any) -> "Tokenizer":
        """From a transformers fast tokenizer (what TransformerLens code passes to `set_tokenizer`
        or the constructor): its `tokenizers` backend (copied), special tokens and chat template."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Backend):
            raise TokenizerError(
                f"cannot use a {type(hf_tokenizer).__name__} as the model's tokenizer: pass a hookedcot Tokenizer "
                "or a transformers *fast* tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
            )
        special = {name: getattr(hf_tokenizer, name, None) for name in _SPECIAL_NAMES}
        special = {k: (str(v) if v is not None else None) for k, v in special.items()}
        template = getattr(hf_tokenizer, "chat_template", None)
        out = cls(Backend.from_str(backend.to_str()), special, (), template if isinstance(template, (str, dict)) else None)
        out.name_or_path = str(getattr(hf_tokenizer, "name_or_path", "") or "")
        out.padding_side = getattr(hf_tokenizer, "padding_side", "right")
        return out

    @classmethod
    def from_gguf(cls, source: Any) -> "Tokenizer":
        """From a GGUF file's metadata as a dict, or an open `gguf.GGUFReader`. (A file path goes
        through `hookedcot.conversions.gguf.convert_gguf`, which reads the file and builds this.)

        Builds what transformers' GGUF converter builds: byte-level BPE over the file's tokens and
        merges, control tokens as special added tokens, user-defined ones as plain added tokens, the
        split regex named by `tokenizer.ggml.pre` (GPT-2's for names it does not know), and BOS/EOS
        as `tokenizer.ggml.add_bos_token` / `add_eos_token` say (default: neither).

        One deliberate difference: control / user-defined tokens spelled outside the byte alphabet
        (R1-Distill's `<｜begin▁of▁sentence｜>`, `<｜User｜>`, ...) keep their own ids and are matched
        whole in text, as llama.cpp and the original tokenizer.json do. transformers drops them
        from the added tokens (and re-adds a named BOS/EOS under a new id past the vocabulary)."""
        meta = _gguf_metadata(source)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer model {kind!r} is not supported; hookedcot builds byte-level BPE ('gpt2') tokenizers, "
                "as used by Qwen2, LLaMA-3, SmolLM2 and R1-Distill files. Load the model's HF folder (tokenizer.json) "
                "for its tokenizer instead."
            )
        if "tokenizer.ggml.merges" not in meta:
            raise TokenizerError("the GGUF file has a BPE vocabulary but no tokenizer.ggml.merges")
        _check_gguf_vocab(meta)
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        added = {i for i, k in enumerate(types) if k in (_CONTROL, _USER_DEFINED)}
        alphabet = set(_BYTE_CHARS.values())
        vocab = {t if set(t) <= alphabet or i in added else _respell(t): i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
        backend = _backend(lambda: Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                               end_of_word_suffix="", fuse_unk=False)), "the GGUF vocabulary and merges")
        split = GGUF_PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, k in zip(tokens, types) if k == _CONTROL])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, k in zip(tokens, types) if k == _USER_DEFINED])
        key_of = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                  "pad_token": "padding_token_id"}
        ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in key_of.items()}
        special = {name: backend.id_to_token(int(i)) if i is not None and 0 <= int(i) < len(tokens) else None
                   for name, i in ids.items()}
        _add_named_specials(backend, special)
        _set_post_processor(backend, special, bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                            bool(meta.get("tokenizer.ggml.add_eos_token", False)))
        stops = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(backend, special, stops, meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """From `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template),
        `chat_template.jinja` (wins over the config's template, as in transformers) and
        `generation_config.json` (extra stop ids). `tokenizer.json`'s post-processor decides BOS,
        as in transformers when that file exists."""
        folder = Path(path).expanduser()
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{folder} has no tokenizer.json; hookedcot reads fast-tokenizer files only. Save one with "
                "transformers (`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`) or pass token ids."
            )
        backend = _backend(lambda: Backend.from_file(str(tokenizer_file)), str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")
        special = {name: _token_content(config.get(name)) for name in _SPECIAL_NAMES}
        odd = {name: value for name, value in special.items() if value is not None and not isinstance(value, str)}
        if odd:
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: special tokens must be strings (or "
                                 f"{{\"content\": string}}), got {odd}")
        _add_named_specials(backend, special)
        if backend.post_processor is None:
            _set_post_processor(backend, special, False, False)
        template: Any = config.get("chat_template")
        if isinstance(template, list):
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                       for t in template):
                raise TokenizerError(f"{folder / 'tokenizer_config.json'}: a list of chat templates must hold "
                                     "{\"name\": string, \"template\": string} objects")
            template = {t["name"]: t["template"] for t in template}
        if template is not None and not isinstance(template, (str, dict)):
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string, got {template!r:.80}")
        if (folder / "chat_template.jinja").is_file():
            template = _read_text(folder / "chat_template.jinja")
        gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        stops = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        if not all(type(i) is int and i >= 0 for i in stops):  # against the embedding: when the model is loaded
            raise TokenizerError(f"{folder / 'generation_config.json'}: eos_token_id={gen_eos!r:.80} must be a token id "
                                 "or a list of ids")
        return cls(backend, special, stops, template)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> Any:
        """Token ids of one text (a list; `return_tensors="pt"` gives a [1, pos] tensor, as in HF)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids if return_tensors is None else _as_tensors([ids], return_tensors)

    def decode(
        self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of one sequence of ids (an int or a 0-d tensor is one id). `clean_up_tokenization_spaces`
        is accepted and ignored, as transformers ignores it for byte-level BPE (it would drop spaces
        before punctuation and make decoding non-invertible)."""
        ids = [int(ids)] if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0) else ids
        return self.backend.decode(_as_list(ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Each token decoded on its own ('Ġthe' reads ' the'); a piece of a multi-byte character reads '�'."""
        return self.backend.decode_batch([[i] for i in _as_list(ids)], skip_special_tokens=False)

    def to_single_token(self, text: str) -> int:
        ids = self.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise TokenizerError(f"{text!r} is not a single token: it tokenizes to {len(ids)} tokens {self.token_strings(ids)}")
        return ids[0]

    def tokenize(
        self, texts: str | Sequence[str], prepend_bos: bool | None = None, padding_side: str = "left",
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [batch, pos], attention mask [batch, pos]), padded with `pad_token_id` on `padding_side`
        (left unless asked: hookedcot's batch tools read the last position; `self.padding_side` is
        for the HF / TransformerLens surface). Rows longer than `max_length` keep their first tokens.

        `prepend_bos=None` does what the tokenizer does by default (`add_bos`); True / False force
        BOS on or off (True adds it even if the text already starts with the BOS string)."""
        _check_side(padding_side)
        rows = [self._encode_row(t, prepend_bos)[:max_length] for t in ([texts] if isinstance(texts, str) else list(texts))]
        if not rows:
            raise ValueError("tokenize needs at least one string")
        width = max(len(r) for r in rows)
        if any(len(r) != width for r in rows) and self.pad_token_id is None:
            raise TokenizerError("these strings have different lengths and the tokenizer has no pad or eos token to pad with")
        tokens = torch.full((len(rows), width), self.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            tokens[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return tokens, mask

    def get_token_position(
        self, single_token: str | int | torch.Tensor, input: str | Sequence[int] | torch.Tensor, mode: str = "first",
        prepend_bos: bool | None = None,
    ) -> int:
        """TransformerLens' `get_token_position`: where a single token (its string or id) first
        (`mode="first"`) or last (`"last"`) occurs in a text or in one sequence of ids ([pos] or [1, pos])."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        ids = self._encode_row(input, prepend_bos) if isinstance(input, str) else _as_list(input)
        target = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        hits = [i for i, t in enumerate(ids) if t == target]
        if not hits:
            raise TokenNotFoundError(f"token {target} ({self.decode([target])!r}) does not occur in the sequence")
        return hits[0] if mode == "first" else hits[-1]

    def _encode_row(self, text: str, prepend_bos: bool | None) -> list[int]:
        ids = self.encode(text, add_special_tokens=True)
        prepend_bos = self.add_bos if prepend_bos is None else prepend_bos
        if prepend_bos == self._encode_adds_bos:
            return ids
        if self._encode_adds_bos and ids[:1] == [self.bos_token_id]:
            ids = ids[1:]
        if prepend_bos:
            if self.bos_token_id is None:
                raise TokenizerError("prepend_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_token_id] + ids
        return ids

    # ------------------------------------------------------------------ the Hugging Face tokenizer surface
    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        padding_side: str | None = None,
    ) -> "BatchEncoding":
        """HF's `tokenizer(text_or_texts, ...)`: a dict-like with `input_ids` and `attention_mask`.

        As in transformers: lists (flat for one string) unless `return_tensors="pt"` / `"np"`;
        `padding=True` / `"longest"` pads to the longest row, `"max_length"` to `max_length`, on
        `padding_side` (default: `self.padding_side`); `truncation=True` with `max_length` cuts rows
        on `self.truncation_side`. Unequal rows without padding cannot become a tensor (an error)."""
        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in ([text] if single else list(text))]
        if truncation not in (None, False, "do_not_truncate") and max_length is not None:
            rows = [r[:max_length] if self.truncation_side == "right" else r[len(r) - max_length:] if len(r) > max_length
                    else r for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding not in (False, None, "do_not_pad"):
            if padding == "max_length" and max_length is None:
                raise ValueError("padding='max_length' needs max_length=")
            width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
            side = padding_side or self.padding_side
            _check_side(side)
            if self.pad_token_id is None and any(len(r) < width for r in rows):
                raise TokenizerError("padding asked for, but this tokenizer has no pad or eos token to pad with")
            pads = [width - len(r) for r in rows]
            rows = [[self.pad_token_id] * n + r if side == "left" else r + [self.pad_token_id] * n for r, n in zip(rows, pads)]
            masks = [[0] * n + m if side == "left" else m + [0] * n for m, n in zip(masks, pads)]
        out = BatchEncoding(input_ids=rows, attention_mask=masks)
        if not return_attention_mask:
            del out["attention_mask"]
        if return_tensors is not None:
            if len({len(r) for r in rows}) > 1:
                raise ValueError("these texts tokenize to different lengths; pass padding=True to make one tensor of them")
            return BatchEncoding({k: _as_tensors(v, return_tensors) for k, v in out.items()})
        return BatchEncoding({k: v[0] for k, v in out.items()}) if single else out

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in sequences]

    def convert_ids_to_tokens(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> Any:
        """Vocabulary entries (byte-alphabet spelling: ' the' is 'Ġthe'); an int gives one string."""
        if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
            return self.backend.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(i) for i in _as_list(ids) if i not in special]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        """Ids of vocabulary entries; an unknown entry gives `unk_token_id` (None if there is none)."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    @property
    def pad_token(self) -> str | None:
        """The pad token's string; the EOS string where padding falls back to EOS."""
        return None if self.pad_token_id is None else self.backend.id_to_token(self.pad_token_id)

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.backend.token_to_id(self.unk_token)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.all_special_tokens]

    # ------------------------------------------------------------------ positions
    def find_token_positions(
        self, ids: Sequence[int] | torch.Tensor | str, target: str | tuple[int, int], occurrence: int = 0
    ) -> list[int]:
        """Positions of the tokens whose characters overlap `target` in `decode(ids)`.

        `target` is a substring (its `occurrence`-th match, 0 = first, -1 = last) or a
        (start, end) character span. A token that is only partly inside counts. A str for `ids`
        is encoded first (with the default special tokens)."""
        ids = self.encode(ids) if isinstance(ids, str) else _as_list(ids)
        text, spans = self._spans(ids)
        decoded = self.decode(ids)
        if isinstance(target, tuple):
            start, end = target
            if not 0 <= start < end <= len(decoded):
                raise TokenizerError(f"span {target} is not a non-empty span inside the {len(decoded)}-character text")
            if self._byte_level:
                start, end = len(decoded[:start].encode("utf-8")), len(decoded[:end].encode("utf-8"))
        else:
            if not target:
                raise TokenizerError("the substring to find is empty")
            needle = target.encode("utf-8").decode("latin-1") if self._byte_level else target
            starts, at = [], text.find(needle)
            while at != -1:
                starts.append(at)
                at = text.find(needle, at + 1)
            if not starts:
                raise TokenizerError(f"{target!r} does not occur in the decoded tokens {decoded[:300]!r}")
            if not -len(starts) <= occurrence < len(starts):
                raise TokenizerError(f"{target!r} occurs {len(starts)} time(s); occurrence={occurrence} is out of range")
            start, end = starts[occurrence], starts[occurrence] + len(needle)
        return [position for position, (lo, hi) in enumerate(spans) if lo < end and hi > start]

    def char_spans(self, ids: Sequence[int] | torch.Tensor) -> tuple[str, list[tuple[int, int]]]:
        """The decoded text and each token's [start, end) in it, in characters. A character split
        across tokens belongs to the token holding its first byte; bytes that are not valid UTF-8
        read as U+FFFD, one per byte, so the offsets stay exact."""
        text, spans = self._spans(_as_list(ids))
        if not self._byte_level:
            return text, spans
        chars = text.encode("latin-1").decode("utf-8", errors="surrogateescape")
        char_at = []  # byte offset -> index of the character holding that byte
        for index, ch in enumerate(chars):
            char_at += [index] * len(ch.encode("utf-8", errors="surrogateescape"))
        char_at.append(len(chars))
        shown = "".join("\ufffd" if "\udc80" <= ch <= "\udcff" else ch for ch in chars)
        out = []
        for lo, hi in spans:
            start = char_at[lo] if lo == 0 or char_at[lo] != char_at[lo - 1] else char_at[lo] + 1
            end = char_at[hi] if hi == len(char_at) - 1 or char_at[hi] != char_at[hi - 1] else char_at[hi] + 1
            out.append((min(start, end), end))
        return shown, out

    def _spans(self, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """The decoded text and each token's [start, end) in it, in bytes of UTF-8 for byte-level
        vocabularies (exact even when a character is split across tokens), else in characters."""
        if not self._byte_level:
            spans, done = [], ""
            for n in range(1, len(ids) + 1):
                now = self.backend.decode(ids[:n], skip_special_tokens=False)
                spans.append((len(done), len(now)))
                done = now
            return done, spans
        raw, spans = b"", []
        for i in ids:
            content = self._added.get(i)
            if content is not None:
                piece = content.encode("utf-8")
            else:
                token = self.backend.id_to_token(i) or ""
                piece = bytes(_CHAR_BYTES[c] for c in token) if set(token) <= _CHAR_BYTES.keys() else token.encode("utf-8")
            spans.append((len(raw), len(raw) + len(piece)))
            raw += piece
        return raw.decode("latin-1"), spans  # one char per byte, so str.find works on byte offsets

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation as transformers' `apply_chat_template` does (same sandbox, same
        helpers, special token strings and extra kwargs visible to the template).

        `tokenize=True` returns ids, encoded without adding special tokens (the template writes
        them). `continue_final_message=True` cuts the text after the last message's content, to
        prefill an assistant turn."""
        rendered = render_chat_template(
            self._template(chat_template), messages, add_generation_prompt=add_generation_prompt, tools=tools,
            documents=documents, continue_final_message=continue_final_message, **{**self.special_tokens, **kwargs},
        )
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def _template(self, name_or_template: str | None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template in templates:
                return templates[name_or_template]
            if name_or_template is None:
                if "default" not in templates:
                    raise ChatTemplateError(f"this tokenizer has named chat templates {sorted(templates)}; pass chat_template=")
                return templates["default"]
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise ChatTemplateError(
                "this model has no chat template (base models usually have none); format the prompt yourself, or pass "
                "chat_template='...' (a jinja template)"
            )
        return templates

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids}, "
                f"pad={self.pad_token_id}, add_bos={self.add_bos}, chat_template={self.chat_template is not None})")


# ---------------------------------------------------------------------- helpers
class BatchEncoding(dict):
    """What `tokenizer(...)` returns, as in HF: a dict whose keys also read as attributes
    (`enc.input_ids`), with `.to(device)` for tensors."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _as_tensors(rows: list[list[int]], return_tensors: str) -> Any:
    if return_tensors == "pt":
        return torch.tensor(rows, dtype=torch.long)
    if return_tensors == "np":
        import numpy as np

        return np.array(rows, dtype=np.int64)
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")


def _gguf_metadata(source: Any) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    return {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}


def _respell(token: str) -> str:
    """A token stored as plain text, spelled in the byte alphabet the BPE model works in."""
    return "".join(_BYTE_CHARS[b] for b in token.encode("utf-8"))


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _add_named_specials(backend: Backend, special: Mapping[str, str | None]) -> None:
    """bos/eos/unk/pad become special added tokens, as transformers makes them (so they are
    matched whole in text and skipped by skip_special_tokens)."""
    tokens = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(v for v in special.values() if v)]
    backend.add_special_tokens(tokens)


def _set_post_processor(backend: Backend, special: Mapping[str, str | None], add_bos: bool, add_eos: bool) -> None:
    """transformers' `update_post_processor`: optional BOS before and EOS after each sequence."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    pairs = ([(bos, backend.token_to_id(bos))] if add_bos else []) + ([(eos, backend.token_to_id(eos))] if add_eos else [])
    backend.post_processor = _backend(lambda: processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs),
                                      f"the BOS/EOS template for {bos!r} / {eos!r}")


def _read_json(path: Path) -> dict[str, Any]:
    from hookedcot.conversions import read_json_file  # strict: duplicate keys, depth, size

    if not path.is_file():
        return {}
    data = read_json_file(path, error=TokenizerError)
    return data if isinstance(data, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path} cannot be read as UTF-8 text: {exc}") from exc


def _backend(build: Any, what: str) -> Backend:
    """Run a `tokenizers` constructor on checkpoint data; its errors (plain `Exception`s, TypeErrors
    from its Rust bindings) become a TokenizerError naming the file."""
    try:
        return build()
    except Exception as exc:
        raise TokenizerError(f"{what} cannot be loaded by the tokenizers library ({type(exc).__name__}: {exc}); "
                             "the tokenizer files are corrupt or from an incompatible version - re-download them") from exc


def _check_gguf_vocab(meta: Mapping[str, Any]) -> None:
    """The tokenizer.ggml.* values have the types llama.cpp writes; anything else is named here,
    not left to fail as a TypeError deep inside the tokenizers library."""
    def ids_ok(value: Any) -> bool:
        return type(value) is int and 0 <= value < len(tokens)

    tokens, types, merges = (meta.get(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
    problems = []
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        problems.append("tokenizer.ggml.tokens must be a non-empty list of strings")
        tokens = []
    if types is not None and not (isinstance(types, list) and len(types) == len(tokens)
                                  and all(type(k) is int for k in types)):
        problems.append(f"tokenizer.ggml.token_type must be a list of {len(tokens)} integers, one per token")
    if not isinstance(merges, list) or not all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges):
        problems.append("tokenizer.ggml.merges must be a list of strings 'left right'")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not ids_ok(value):
            problems.append(f"tokenizer.ggml.{key}={value!r:.40} must be a token id below {len(tokens)}")
    for key in ("add_bos_token", "add_eos_token"):
        if not isinstance(meta.get(f"tokenizer.ggml.{key}", False), bool):
            problems.append(f"tokenizer.ggml.{key} must be true or false")
    for key in ("tokenizer.ggml.pre", "tokenizer.chat_template"):
        if not isinstance(meta.get(key, ""), str):
            problems.append(f"{key} must be a string")
    if problems:
        raise TokenizerError("the GGUF tokenizer metadata is malformed: " + "; ".join(problems))


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 and ids.shape[0] != 1:
            raise ValueError(f"expected one sequence of ids, got a tensor of shape {tuple(ids.shape)}")
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]
