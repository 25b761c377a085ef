"""hookedcot.Tokenizer against transformers' tokenizer for the same GGUF file / HF folder.

The reference is `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (what a user comparing with
transformers gets); ids, decoding, chat templates and the added-token handling must agree on a
varied corpus. Pre-tokenizer variants (`tokenizer.ggml.pre`) are compared on the SmolLM2 vocabulary
against transformers' own GGUF tokenizer builder.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
import torch

from gguf_factory import tiny_vocab, write_gguf
from hookedcot.embedded import embedded_model_path
from hookedcot.chat_template import ChatTemplateError
from hookedcot.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

_HANDWRITTEN = [
    "", " ", "  ", "\t", "\n", "\n\n\n", "\r\n", " \t \n ", "Hello world", " Hello world", "Hello  world   ",
    "hello\tworld\nnew line", "Q: 12*7?\nA:", "Q: 3+4?\nA: 7", "1234567890", "3.14159265358979", "-42, +17, 1e-9",
    "The year 2024 had 366 days.", "0x1F, 0b1010, 1_000_000", "$1,234.56 and €99", "I'm you're they've we'll she'd",
    "DON'T SHOUT, IT'S RUDE", "naïve café résumé", "Straße, Ærøskøbing, Ångström", "Привет, мир!", "Γειά σου Κόσμε",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "你好，世界！", "日本語のテキスト、カタカナ。", "한국어 텍스트",
    "emoji 🙂🚀🔥 and 👨‍👩‍👧‍👦 family", "flags 🇫🇷🇯🇵", "math ∑∫√∞ ≤ ≥ ≠ → ⇒", "zero\u200bwidth\u200djoiner",
    "combining e\u0301 vs é", "\u00a0non-breaking\u00a0space", "\x00\x01 control chars \x7f",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    '{"key": [1, 2, {"nested": null}], "ok": true}', "<html><body class='x'>hi</body></html>",
    "https://example.com/path?q=1&r=two#frag", "user@example.com", "C:\\Users\\name\\file.txt",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>", "text<|im_end|>more", "<|im_start |> not special",
    "<repo_name>x<file_sep>y<jupyter_code>z", "<think>reasoning</think> answer",
    "Let's think step by step. First, 12 * 7 = 84. So the answer is 84.",
    "a" * 200, " " * 50, "ab " * 40, "\n" * 30 + "x", "🙂" * 20, "1" * 100, "12 " * 30,
]
_PIECES = [
    "the", " the", "The", " cat", "sat", " on", " mat", "ing", "tion", ".", ",", "!", "?", ":", ";", "'s", "'re",
    " 7", "42", "3.5", "2024", "000", " ", "  ", "\t", "\n", "\n\n", "\r\n", "é", "ß", "ñ", "日本", "中文", "한", "🙂",
    "🚀", "👍🏽", "∑", "→", "(", ")", "[", "]", "{", "}", "==", "->", "//", "#", "@", "_", "-", "<|im_start|>",
    "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "Q:", "A:", "\\n", "\u200b", "ﬁ", "Ⅻ", "½", "²",
]


def corpus(n_random: int = 240, seed: int = 0) -> list[str]:
    """Hand-written edge cases plus seeded random concatenations of tricky pieces."""
    rng = random.Random(seed)
    generated = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 24))) for _ in range(n_random)]
    return _HANDWRITTEN + generated


CORPUS = corpus()


def _ids(out) -> list[int]:
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.fixture(scope="module")
def smol_path():
    return embedded_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smol_metadata(smol_path):
    from hookedcot.conversions.gguf import open_reader, read_metadata

    return {k: v for k, v in read_metadata(open_reader(smol_path)).items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(smol_metadata) -> Tokenizer:
    return Tokenizer.from_gguf(smol_metadata)


@pytest.fixture(scope="module")
def theirs(smol_path):
    return transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


def test_corpus_is_varied():
    assert len(CORPUS) >= 300
    assert any(ord(c) > 0xFFFF for s in CORPUS for c in s)  # astral-plane emoji
    assert any("<|im_start|>" in s for s in CORPUS)


def test_special_ids_match_transformers(ours, theirs):
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert ours.eos_token_id == theirs.eos_token_id == 2
    assert ours.pad_token_id == theirs.pad_token_id == 2
    assert ours.eos_token_ids == [2]
    assert ours.add_bos is False
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.backend.get_vocab() == theirs.get_vocab()


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours, theirs, add_special_tokens):
    mismatches = [
        s for s in CORPUS
        if ours.encode(s, add_special_tokens=add_special_tokens) != theirs(s, add_special_tokens=add_special_tokens)["input_ids"]
    ]
    assert not mismatches, f"{len(mismatches)}/{len(CORPUS)} strings tokenize differently, e.g. {mismatches[:3]!r}"


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_transformers(ours, theirs, skip_special_tokens):
    for s in CORPUS:
        ids = ours.encode(s)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == theirs.decode(
            ids, skip_special_tokens=skip_special_tokens
        ), s


def test_decode_round_trips(ours):
    assert [ours.decode(ours.encode(s)) for s in CORPUS] == CORPUS


def test_token_strings_are_readable_pieces(ours, theirs):
    ids = ours.encode("Hello world, 日本 🙂<|im_end|>")
    pieces = ours.token_strings(ids)
    assert pieces == [theirs.decode([i]) for i in ids]
    assert pieces[:3] == ["Hello", " world", ","]
    assert pieces[-1] == "<|im_end|>"
    assert ours.token_strings(torch.tensor([ids])) == pieces


_CHATS = [
    [{"role": "user", "content": "What is 12*7?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 🙂"}, {"role": "user", "content": "日本語で?"}],
    [{"role": "user", "content": "  spaces\n\nand\tnewlines  "}],
]


@pytest.mark.parametrize("chat", _CHATS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(ours, theirs, chat, add_generation_prompt):
    text = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == _ids(theirs.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True))
    assert ids[0] == 1  # <|im_start|>, written by the template


def test_chat_template_continue_final_message(ours, theirs):
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Let me think"}]
    text = ours.apply_chat_template(chat, continue_final_message=True)
    assert text == theirs.apply_chat_template(chat, continue_final_message=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\nLet me think")


_R1_STYLE_TEMPLATE = """{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}
{%- set ns = namespace(system_prompt='', is_tool=false) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{% endif -%}
{%- endfor -%}
{{ bos_token }}{{ ns.system_prompt }}
{%- if tools %}<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}</tools>{% endif %}
{%- for message in messages %}
  {%- if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}
  {%- elif message['role'] == 'assistant' %}{% set content = message['content'] %}
    {%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif -%}
    <｜Assistant｜>{% generation %}{{ content }}{% endgeneration %}<｜end▁of▁sentence｜>
  {%- elif message['role'] not in ['system'] %}{{ raise_exception('unknown role ' + message['role']) }}
  {%- endif %}
  {%- if loop.last and add_generation_prompt %}<｜Assistant｜><think>
{% endif %}
{%- endfor %}{% if enable_thinking is defined and not enable_thinking %}(no thinking){% endif %}"""


@pytest.mark.parametrize("options", [{}, {"enable_thinking": False}, {"tools": [{"name": "calc", "parameters": {"x": "é"}}]}])
def test_complex_template_matches_transformers(ours, theirs, options):
    chat = [{"role": "system", "content": "You are careful."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n\n4"}, {"role": "user", "content": "3*3?"}]
    for generation_prompt in (False, True):
        text = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt,
                                        chat_template=_R1_STYLE_TEMPLATE, **options)
        assert text == theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False,
                                                  chat_template=_R1_STYLE_TEMPLATE, **options)
    assert "2+2=4" not in text and "<｜Assistant｜><think>\n" in text


def test_chat_template_sandbox_and_helpers(ours):
    template = "{{ bos_token }}{% for m in messages %}{{ m.content | tojson }}{% endfor %}{{ strftime_now('%Y')[:2] }}"
    assert ours.apply_chat_template([{"role": "user", "content": "é\"<"}], chat_template=template) == '<|im_start|>"é\\"<"20'
    with pytest.raises(Exception, match="no roles"):
        ours.apply_chat_template([], chat_template="{{ raise_exception('no roles') }}")
    for escape in ["{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}",
                   "{% set ns = namespace() %}{% set ns.__class__ = 1 %}"]:
        with pytest.raises(Exception):  # the immutable sandbox refuses attribute tricks and mutation
            ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=escape)


def test_missing_chat_template_is_a_clear_error(ours):
    bare = Tokenizer(ours.backend, ours.special_tokens)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tokenize_left_pads_with_mask(ours):
    texts = ["Q: 12*7?\nA:", "Hi", "A much longer prompt with several more words"]
    tokens, mask = ours.tokenize(texts)
    assert tokens.dtype == mask.dtype == torch.long and tokens.shape == mask.shape
    for row, m, text in zip(tokens, mask, texts):
        ids = ours.encode(text)
        assert row[m.bool()].tolist() == ids
        assert m.tolist() == [0] * (len(row) - len(ids)) + [1] * len(ids)
        assert (row[~m.bool()] == ours.pad_token_id).all()
    right, rmask = ours.tokenize(texts, padding_side="right")
    assert right[1, : rmask[1].sum()].tolist() == ours.encode("Hi") and rmask[1, 0] == 1


def test_tokenize_prepend_bos(ours):
    default, _ = ours.tokenize("Hello")
    assert default.tolist() == [ours.encode("Hello")]
    forced, _ = ours.tokenize("Hello", prepend_bos=True)
    assert forced.tolist() == [[ours.bos_token_id] + ours.encode("Hello")]
    off, _ = ours.tokenize("Hello", prepend_bos=False)
    assert off.tolist() == default.tolist()


def test_to_single_token(ours):
    assert ours.to_single_token(" the") == ours.encode(" the")[0]
    assert ours.to_single_token("<|im_end|>") == 2
    with pytest.raises(TokenizerError, match="not a single token"):
        ours.to_single_token(" antidisestablishmentarianism")


def test_find_token_positions(ours):
    text = "Q: what is 12*7? A: 12*7 = 84 🙂 done"
    ids = ours.encode(text)
    pieces = ours.token_strings(ids)
    first = ours.find_token_positions(ids, "12*7")
    assert "".join(pieces[i] for i in first) == "12*7"
    second = ours.find_token_positions(ids, "12*7", occurrence=1)
    assert second != first and "".join(pieces[i] for i in second) == "12*7"
    assert ours.find_token_positions(ids, "12*7", occurrence=-1) == second
    partial = ours.find_token_positions(ids, "hat")  # inside " what": the whole token counts
    assert [pieces[i] for i in partial] == [" what"]
    emoji = ours.find_token_positions(ids, "🙂")  # one character spread over several byte tokens
    assert len(emoji) >= 1 and ours.decode([ids[i] for i in emoji]).strip() == "🙂"
    start = text.index("84")
    assert ours.find_token_positions(ids, (start, start + 2)) == ours.find_token_positions(ids, "84")
    assert ours.find_token_positions(text, "84") == ours.find_token_positions(ids, "84")
    with pytest.raises(TokenizerError, match="does not occur"):
        ours.find_token_positions(ids, "13*7")
    with pytest.raises(TokenizerError, match="occurs 2 time"):
        ours.find_token_positions(ids, "12*7", occurrence=2)


def test_find_token_positions_with_special_tokens(ours):
    ids = ours.apply_chat_template(_CHATS[0], add_generation_prompt=True, tokenize=True)
    assert [ours.token_strings(ids)[i] for i in ours.find_token_positions(ids, "assistant")] == [" assistant"]  # system prompt
    positions = ours.find_token_positions(ids, "assistant", occurrence=-1)
    assert "".join(ours.token_strings(ids)[i] for i in positions) == "assistant"
    assert ids[positions[0] - 1] == 1  # right after <|im_start|>


# ---------------------------------------------------------------------- pre-tokenizer variants
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "deepseek-r1-qwen", "gpt-4o", "smollm", "something-new"])
def test_pre_tokenizer_variants_match_transformers(smol_metadata, pre):
    """Each `tokenizer.ggml.pre` we map (and an unknown one) splits text as transformers does."""
    from transformers.integrations.gguf import convert_gguf_tokenizer

    meta = {**smol_metadata, "tokenizer.ggml.pre": pre}
    ours = Tokenizer.from_gguf(meta)
    tokenizer_dict = {"tokenizer_type": "gpt2", "pre_tokenizer_type": pre, "tokens": meta["tokenizer.ggml.tokens"],
                      "merges": meta["tokenizer.ggml.merges"], "token_type": meta["tokenizer.ggml.token_type"]}
    backend, _ = convert_gguf_tokenizer("llama", tokenizer_dict)
    for s in CORPUS:
        assert ours.encode(s, add_special_tokens=False) == backend.encode(s, add_special_tokens=False).ids, (pre, s)


# ---------------------------------------------------------------------- tiny GGUF: add_bos, odd tokens, HF folder
@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "add_bos"])
def tiny_gguf(request, tmp_path_factory):
    from transformers import LlamaConfig

    vocab = {**tiny_vocab(), "tokenizer.ggml.add_bos_token": request.param, "tokenizer.ggml.eot_token_id": 320}
    config = LlamaConfig(vocab_size=len(vocab["tokenizer.ggml.tokens"]), hidden_size=32, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("tok")
    return write_gguf(folder / "tiny.gguf", "llama", config, {}, vocab), request.param


def test_tiny_gguf_matches_transformers(tiny_gguf):
    from gguf import GGUFReader

    from hookedcot.conversions.gguf import open_reader, read_metadata

    path, add_bos = tiny_gguf
    ours = Tokenizer.from_gguf(read_metadata(open_reader(path)))
    assert Tokenizer.from_gguf(GGUFReader(path)).backend.to_str() == ours.backend.to_str()
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.add_bos is add_bos
    assert ours.eos_token_ids == [ours.eos_token_id, 320]  # eot joins the stop ids
    odd = "<|中文|>"  # a control token spelled outside the byte alphabet: see the next test
    assert {k: v for k, v in ours.backend.get_vocab().items() if k != odd} == {
        k: v for k, v in theirs.get_vocab().items() if v != ours.backend.token_to_id(odd)}
    for s in CORPUS:
        assert ours.encode(s) == theirs(s)["input_ids"], s
        ids = ours.encode(s)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), s
    think = ours.encode("<think>", add_special_tokens=False)  # user-defined: kept whole, not special
    assert len(think) == 1 and ours.decode(think, skip_special_tokens=True) == "<think>"


def test_control_tokens_outside_the_byte_alphabet_keep_their_ids():
    """R1-Distill files spell `<｜begin▁of▁sentence｜>`, `<｜User｜>` ... outside the byte alphabet.
    llama.cpp matches them whole under their own ids; so do we. (transformers' GGUF tokenizer
    splits them into bytes and gives a named BOS a new id past the vocabulary.)"""
    vocab = tiny_vocab()
    odd = vocab["tokenizer.ggml.tokens"].index("<|中文|>")
    tok = Tokenizer.from_gguf({**vocab, "tokenizer.ggml.bos_token_id": odd, "tokenizer.ggml.add_bos_token": True})
    assert tok.bos_token_id == odd and tok.vocab_size == len(vocab["tokenizer.ggml.tokens"])
    ids = tok.encode("hi <|中文|> x")
    assert ids[0] == odd and ids.count(odd) == 2
    assert tok.decode(ids) == "<|中文|>hi <|中文|> x" and tok.decode(ids, skip_special_tokens=True) == "hi  x"


def test_hf_folder_matches_transformers(tiny_gguf, tmp_path):
    """A folder saved by transformers (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    path, add_bos = tiny_gguf
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    theirs.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [322, 319]}')
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_hf_folder(tmp_path)
    assert ours.add_bos is add_bos
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id)
    assert ours.eos_token_ids == [322, 319]
    assert ours.chat_template == reloaded.chat_template
    for s in CORPUS:
        assert ours.encode(s) == reloaded(s)["input_ids"], s
    chat = _CHATS[1]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == reloaded.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False)


def test_hf_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_sentencepiece_gguf_is_rejected_clearly():
    with pytest.raises(TokenizerError, match="'llama' is not supported"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>"]})
