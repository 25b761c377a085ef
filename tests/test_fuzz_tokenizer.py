"""Fuzzed tokenizers and chat templates: every mutation is refused with a HookedCoTError or gives a
working tokenizer / a rendered prompt. 1,000 seeded tokenizer cases (GGUF tokenizer metadata and
HF folder files alternately) and 1,000 chat-template cases here, more under `-m slow`.

Tokenizer mutations: GGUF `tokenizer.ggml.*` values replaced by values of any type, a token or
merge corrupted (wrong type, unknown token, three parts), ids out of the vocabulary; HF
`tokenizer.json` byte edits and truncation, `tokenizer_config.json` / `generation_config.json`
values of any type, repeated keys, deep nesting, a `chat_template.jinja` that is not UTF-8.
A loaded tokenizer is consistent when its special ids lie inside its vocabulary, and encoding
then decoding a text works and gives ids inside the vocabulary.

Template mutations: jinja fragments inserted (loops over huge ranges, repetition, recursion,
attribute access into Python internals, raise_exception), spans deleted or duplicated. A render
that succeeds returns a string within the renderer's size bound, with no time limit needed: the
slowest case is reported.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fuzzing import Tally, mutate_bytes, mutate_json_object, random_json, run_case
from gguf_factory import CHAT_TEMPLATE
from hookedcot.chat_template import MAX_VALUE_CHARS, render_chat_template
from hookedcot.tokenizer import Tokenizer
from test_fuzz_gguf import fuzz_vocab

FAST_CASES, SLOW_CASES = 1000, 20000
MEMORY_EVERY = 10
TEXT = "the fox 42 <think>é</think> <|im_start|>"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"},
            {"role": "assistant", "content": "42"}, {"role": "user", "content": "Why?"}]
TOOL_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'system' %}{{ '<|system|>' + message.content | trim }}"
    "{%- elif loop.last and message.role == 'user' %}{{ '<|user|>' ~ message['content'] ~ '<|end|>' }}"
    "{%- else %}{{ '<|' + message.role + '|>' + message.content }}{% endif %}{%- endfor %}"
    "{%- if tools %}{{ tools | tojson }}{% endif %}{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
FRAGMENTS = ["{{", "}}", "{%", "%}", "{% for i in range(100000) %}", "{% endfor %}", "{{ 'x' * 100000000 }}",
             "{{ messages * 1000000 }}", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "{{ ''.__class__ }}",
             "{{ raise_exception('stop') }}", "{{ messages[99] }}", "{{ 2 ** 100000 }}", "{% set x = x ~ x %}",
             "{{ range(10**9) }}", "{{ message.content + 1 }}", "{% if %}", "{{ namespace(_x=1) }}", "~", "|", "(",
             "{{ messages|tojson }}", "{% for m in messages %}{% for n in messages %}{{ n }}{% endfor %}{% endfor %}",
             "{{ strftime_now('%Y') }}", "{%- generation %}x{% endgeneration %}", "\x00", "é"]


def _gguf_meta() -> dict:
    return {k: v for k, v in fuzz_vocab().items() if k.startswith("tokenizer.")}


def _check_tokenizer(tok: Tokenizer) -> None:
    n = tok.vocab_size
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tok, name)
        assert value is None or 0 <= value < n, f"{name}={value} outside the vocabulary of {n}"
    assert all(type(i) is int and i >= 0 for i in tok.eos_token_ids), f"stop ids {tok.eos_token_ids}"  # vs the embedding: at load
    ids = tok.encode(TEXT)
    assert all(0 <= i < n for i in ids)
    assert isinstance(tok.decode(ids), str)


def gguf_tokenizer_case(meta: dict, rng: random.Random) -> tuple[dict, str]:
    meta = json.loads(json.dumps(meta))
    key = rng.choice(sorted(meta))
    kind = rng.choice(["value", "element", "element", "element"])
    if kind == "element" and isinstance(meta[key], list) and meta[key]:
        at = rng.randrange(len(meta[key]))
        meta[key][at] = rng.choice([random_json(rng), "", "zz", "t h e", "th", meta[key][0], 10**6, None])
        return meta, f"{key}[{at}] := {str(meta[key][at])[:40]}"
    meta[key] = rng.choice([random_json(rng), -1, 10**6, len(meta["tokenizer.ggml.tokens"]), [], "qwen2", None])
    if meta[key] is None:
        del meta[key]
    return meta, f"{key} := {str(meta.get(key))[:40]}"


def hf_tokenizer_case(files: dict[str, str], rng: random.Random, folder: Path) -> str:
    """Write the folder's tokenizer files with one of them mutated; returns what was done."""
    name = rng.choice(sorted(files))
    for other, text in files.items():
        (folder / other).write_text(text, encoding="utf-8")
    if name == "chat_template.jinja":
        data, what, _ = mutate_bytes(files[name].encode(), rng, [], [])
        (folder / name).write_bytes(data)
        return f"{name}: {what}"
    obj = json.loads(files[name])
    if name == "tokenizer.json" and rng.random() < 0.5:
        data, what, _ = mutate_bytes(files[name].encode(), rng, [], [])
        (folder / name).write_bytes(data)
        return f"{name}: {what}"
    keys = list(obj) if name != "tokenizer.json" else ["model", "added_tokens", "pre_tokenizer", "decoder",
                                                       "post_processor", "normalizer"]
    text, what = mutate_json_object(obj, rng, keys)
    (folder / name).write_text(text, encoding="utf-8")
    return f"{name}: {what}"


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory) -> dict[str, str]:
    tok = Tokenizer.from_gguf(_gguf_meta())
    return {
        "tokenizer.json": tok.backend.to_str(),
        "tokenizer_config.json": json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                                             "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
                                             "model_max_length": 2048}),
        "generation_config.json": json.dumps({"bos_token_id": 47, "eos_token_id": [48, 46], "do_sample": False}),
        "chat_template.jinja": CHAT_TEMPLATE,
    }


def fuzz_tokenizers(hf_files: dict[str, str], n: int, seed: int, folder: Path) -> Tally:
    tally = Tally("tokenizer")
    rng = random.Random(seed)
    meta = _gguf_meta()
    for i in range(n):
        if i % 2 == 0:
            mutated, what = gguf_tokenizer_case(meta, rng)
            run_case(tally, f"seed {seed} case {i} (GGUF {what})", lambda: Tokenizer.from_gguf(mutated),
                     _check_tokenizer, measure_memory=i % MEMORY_EVERY == 0)
        else:
            what = hf_tokenizer_case(hf_files, rng, folder)
            run_case(tally, f"seed {seed} case {i} (HF {what})", lambda: Tokenizer.from_hf_folder(folder),
                     _check_tokenizer, measure_memory=i % MEMORY_EVERY == 0)
            assert sorted(p.name for p in folder.iterdir()) == sorted(hf_files), f"case {i} left files behind"
    return tally


def mutate_template(template: str, rng: random.Random) -> tuple[str, str]:
    at = rng.randrange(len(template) + 1)
    kind = rng.choice(["insert", "insert", "insert", "delete", "duplicate", "swap"])
    if kind == "insert":
        fragment = rng.choice(FRAGMENTS)
        return template[:at] + fragment + template[at:], f"insert {fragment[:30]!r} at {at}"
    span = rng.choice([1, 2, 5, 20])
    if kind == "delete":
        return template[:at] + template[at + span:], f"delete {span} at {at}"
    if kind == "duplicate":
        return template[:at] + template[at: at + span] * rng.choice([2, 10]) + template[at:], f"duplicate {span} at {at}"
    other = rng.randrange(len(template))
    chars = list(template)
    if at < len(chars):
        chars[at], chars[other] = chars[other], chars[at]
    return "".join(chars), f"swap {at} and {other}"


def _check_render(text: str) -> None:
    assert isinstance(text, str) and len(text) <= MAX_VALUE_CHARS


def fuzz_templates(templates: list[str], n: int, seed: int) -> Tally:
    tally = Tally("chat template")
    rng = random.Random(seed)
    for i in range(n):
        template, what = templates[i % len(templates)], ""
        for _ in range(rng.choice([1, 1, 2, 3])):
            template, step = mutate_template(template, rng)
            what += step + "; "
        kwargs = {"add_generation_prompt": rng.random() < 0.5, "tools": [{"name": "calc"}] if rng.random() < 0.3 else None}
        run_case(tally, f"seed {seed} case {i} ({what})",
                 lambda: render_chat_template(template, MESSAGES, **kwargs), _check_render,
                 measure_memory=i % MEMORY_EVERY == 0)
    return tally


def _assert_clean(tally: Tally, n: int) -> None:
    print("\n" + tally.summary())
    assert tally.cases == n
    assert not tally.escaped, f"{len(tally.escaped)} cases escaped as non-hookedcot errors:\n" + "\n".join(tally.escaped[:20])


def test_a_thousand_mutated_tokenizers_are_refused_or_work(hf_files, tmp_path):
    tally = fuzz_tokenizers(hf_files, FAST_CASES, seed=16, folder=tmp_path)
    _assert_clean(tally, FAST_CASES)
    assert tally.outcomes["loaded"] > 0


def test_a_thousand_mutated_chat_templates_are_refused_or_render(smol_path):
    from hookedcot.conversions.gguf import open_reader, read_metadata

    smol_template = read_metadata(open_reader(smol_path))["tokenizer.chat_template"]
    tally = fuzz_templates([CHAT_TEMPLATE, TOOL_TEMPLATE, smol_template], FAST_CASES, seed=16)
    _assert_clean(tally, FAST_CASES)
    assert tally.outcomes["loaded"] > 0


@pytest.mark.slow
def test_many_mutated_tokenizers_and_templates(hf_files, tmp_path, smol_path):
    from hookedcot.conversions.gguf import open_reader, read_metadata

    _assert_clean(fuzz_tokenizers(hf_files, SLOW_CASES, seed=1616, folder=tmp_path), SLOW_CASES)
    smol_template = read_metadata(open_reader(smol_path))["tokenizer.chat_template"]
    _assert_clean(fuzz_templates([CHAT_TEMPLATE, TOOL_TEMPLATE, smol_template], SLOW_CASES, seed=1616), SLOW_CASES)


@pytest.mark.parametrize("edit", ["token out of vocabulary in a merge", "merge of three parts", "pre as a list"])
def test_attacker_gguf_tokenizers_from_the_issue_are_refused(edit):
    from hookedcot.tokenizer import TokenizerError

    meta = _gguf_meta()
    if edit == "token out of vocabulary in a merge":
        meta["tokenizer.ggml.tokens"] = ["zz" if t == "th" else t for t in meta["tokenizer.ggml.tokens"]]
    elif edit == "merge of three parts":
        meta["tokenizer.ggml.merges"] = ["t h e", *meta["tokenizer.ggml.merges"]]
    else:
        meta["tokenizer.ggml.pre"] = ["qwen2"] * 1000
    with pytest.raises(TokenizerError, match="tokeniz"):
        Tokenizer.from_gguf(meta)
