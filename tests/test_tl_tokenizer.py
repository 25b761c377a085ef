"""`model.tokenizer` answers the Hugging Face tokenizer calls TransformerLens notebooks make.

The oracle is transformers' own tokenizer for the same GGUF file (`AutoTokenizer.from_pretrained
(dir, gguf_file=...)`): same ids, masks, padding, truncation, decoding and special tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hookedcot.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world", "The cat sat on the mat, didn't it ?", "日本 🙂", "<|im_start|>user\nhi<|im_end|>", " a", ""]


@pytest.fixture(scope="module")
def ours(smol_model) -> Tokenizer:
    return smol_model.tokenizer


@pytest.fixture(scope="module")
def theirs(smol_path):
    return transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


@pytest.fixture
def sides(ours, theirs):
    """Restores both tokenizers' padding / truncation sides after a test changes them."""
    saved = (ours.padding_side, theirs.padding_side, ours.truncation_side, theirs.truncation_side)
    yield
    ours.padding_side, theirs.padding_side, ours.truncation_side, theirs.truncation_side = saved


def _plain(enc) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in dict(enc).items()}


def test_special_token_strings_and_ids_match_transformers(ours, theirs):
    for name in ("bos_token", "eos_token", "pad_token", "unk_token",
                 "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs)
    assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
    assert sorted(ours.all_special_tokens) == sorted(theirs.all_special_tokens)


def test_get_vocab_and_token_conversions_match_transformers(ours, theirs):
    vocab = ours.get_vocab()
    assert vocab == theirs.get_vocab()
    ids = [0, 1, 2, 3, 504, 260, 49151] + ours.encode(" naïve café 🙂")
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(504) == theirs.convert_ids_to_tokens(504)
    assert ours.convert_ids_to_tokens(torch.tensor(ids)) == theirs.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == theirs.convert_ids_to_tokens(
        ids, skip_special_tokens=True)
    pieces = ["Ġthe", "<|im_end|>", "The", "not-a-token-zzz"]
    assert ours.convert_tokens_to_ids(pieces) == theirs.convert_tokens_to_ids(pieces)
    assert ours.convert_tokens_to_ids("Ġthe") == theirs.convert_tokens_to_ids("Ġthe") == vocab["Ġthe"]


@pytest.mark.parametrize("text", [TEXTS[0], TEXTS, TEXTS[1:3]])
def test_call_without_tensors_matches_transformers(ours, theirs, text):
    assert _plain(ours(text)) == _plain(theirs(text))
    assert _plain(ours(text, add_special_tokens=False)) == _plain(theirs(text, add_special_tokens=False))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensors_match_transformers_on_either_side(ours, theirs, sides, side):
    ours.padding_side = theirs.padding_side = side
    mine, ref = ours(TEXTS, return_tensors="pt", padding=True), theirs(TEXTS, return_tensors="pt", padding=True)
    assert set(mine) == set(ref) == {"input_ids", "attention_mask"}
    assert torch.equal(mine["input_ids"], ref["input_ids"]) and torch.equal(mine.attention_mask, ref["attention_mask"])
    assert mine.input_ids.dtype == torch.long
    # the side can also be given per call, whatever the attribute says
    other = "right" if side == "left" else "left"
    assert torch.equal(ours(TEXTS, return_tensors="pt", padding=True, padding_side=other)["input_ids"],
                       theirs(TEXTS, return_tensors="pt", padding=True, padding_side=other)["input_ids"])


def test_padding_to_max_length_truncation_and_numpy_match_transformers(ours, theirs, sides):
    kw = dict(padding="max_length", truncation=True, max_length=5)
    for side in ("left", "right"):
        ours.truncation_side = theirs.truncation_side = ours.padding_side = theirs.padding_side = side
        assert _plain(ours(TEXTS, **kw)) == _plain(theirs(TEXTS, **kw))
        assert _plain(ours(TEXTS, return_tensors="pt", **kw)) == _plain(theirs(TEXTS, return_tensors="pt", **kw))
    mine, ref = ours(TEXTS[:2], return_tensors="np", padding=True), theirs(TEXTS[:2], return_tensors="np", padding=True)
    assert isinstance(mine["input_ids"], np.ndarray) and np.array_equal(mine["input_ids"], ref["input_ids"])
    assert "attention_mask" not in ours(TEXTS[0], return_attention_mask=False)


def test_one_string_to_pt_is_a_batch_of_one(ours, theirs):
    mine = ours(TEXTS[1], return_tensors="pt")
    assert mine["input_ids"].shape == (1, len(ours.encode(TEXTS[1])))
    assert torch.equal(mine["input_ids"], theirs(TEXTS[1], return_tensors="pt")["input_ids"])
    assert torch.equal(ours.encode(TEXTS[1], return_tensors="pt"), theirs.encode(TEXTS[1], return_tensors="pt"))
    assert mine.to("cpu")["input_ids"].device.type == "cpu"


def test_unequal_rows_without_padding_refuse_to_become_a_tensor(ours):
    with pytest.raises(ValueError, match="padding=True"):
        ours(TEXTS, return_tensors="pt")


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("clean", [False, True])
def test_decode_and_batch_decode_match_transformers(ours, theirs, skip, clean):
    rows = theirs(TEXTS, return_tensors="pt", padding=True)["input_ids"]
    kw = dict(skip_special_tokens=skip, clean_up_tokenization_spaces=clean)  # ignored by both for BPE
    assert ours.batch_decode(rows, **kw) == theirs.batch_decode(rows, **kw)
    assert ours.batch_decode(rows.tolist(), **kw) == theirs.batch_decode(rows.tolist(), **kw)
    for row in rows:
        assert ours.decode(row, **kw) == theirs.decode(row, **kw)
    assert ours.decode(504) == theirs.decode(504) == ours.decode(torch.tensor(504))


def test_padding_side_is_settable_and_model_tokenize_stays_left_padded(ours, smol_model, sides):
    ours.padding_side = "right"
    right = ours(TEXTS[:2], return_tensors="pt", padding=True)["attention_mask"]
    assert right[:, 0].tolist() == [1, 1] and 0 in right[0].tolist()
    _, mask = smol_model.tokenize(TEXTS[:2])  # hookedcot's batch tools read the last position
    assert mask[:, -1].tolist() == [1, 1]
    with pytest.raises(ValueError, match="'left' or 'right'"):
        ours(TEXTS, padding=True, padding_side="middle")


def test_get_token_position_finds_first_and_last(ours):
    ids = ours.encode(" cat and dog and cat")
    cat = ours.convert_tokens_to_ids("Ġcat")
    assert ours.get_token_position(" cat", ids) == 0
    assert ours.get_token_position(cat, torch.tensor([ids]), mode="last") == len(ids) - 1
    assert ours.get_token_position(" and", " cat and dog and cat", mode="last") == 3
    with pytest.raises(TokenizerError, match="does not occur"):
        ours.get_token_position(" mouse", ids)
    with pytest.raises(ValueError, match="mode"):
        ours.get_token_position(" cat", ids, mode="middle")


def test_tokenize_max_length_keeps_the_first_tokens(ours):
    tokens, mask = ours.tokenize(TEXTS[:2], max_length=3)
    assert tokens.shape == (2, 3)
    assert tokens[1].tolist() == ours.encode(TEXTS[1])[:3]


# ---------------------------------------------------------------------- hookedcot.utils (TL's utils)
from hookedcot import utils  # noqa: E402


def test_array_helpers_follow_transformer_lens():
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert utils.get_corner(x, n=2).shape == (1, 2, 2, 2) and torch.equal(utils.get_corner(x), x[:, :, :, :3])
    assert utils.remove_batch_dim(x).shape == (2, 3, 4) and utils.remove_batch_dim(x[0]).shape == (2, 3, 4)
    assert utils.transpose(x).shape == (1, 2, 4, 3)
    half = utils.to_numpy(x.to(torch.bfloat16).requires_grad_())
    assert isinstance(half, np.ndarray) and half.dtype == np.float32 and half[0, 1, 2, 3] == 23
    assert utils.to_numpy([1, 2]).tolist() == [1, 2] and utils.to_numpy(3).item() == 3
    with pytest.raises(ValueError, match="invalid type"):
        utils.to_numpy(object())
    assert utils.get_act_name("resid_pre", 3) == "blocks.3.hook_resid_pre"


def test_lm_loss_and_accuracy_equal_a_hand_loop():
    gen = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(2, 5, 7, generator=gen), torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    nll = [[-(logits[b, p, tokens[b, p + 1]] - logits[b, p].exp().sum().log()).item() for p in range(4)] for b in range(2)]
    keep = [[p >= 1 for p in range(4)], [True] * 4]
    per_token = utils.lm_cross_entropy_loss(logits, tokens, per_token=True)
    torch.testing.assert_close(per_token, torch.tensor(nll))
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, tokens), torch.tensor(nll).mean())
    masked = sum(v for row, k in zip(nll, keep) for v, kk in zip(row, k) if kk) / 7
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, tokens, attention_mask=mask), torch.tensor(masked))
    hits = [[int(logits[b, p].argmax()) == int(tokens[b, p + 1]) for p in range(4)] for b in range(2)]
    assert utils.lm_accuracy(logits, tokens, per_token=True).tolist() == hits
    assert utils.lm_accuracy(logits, tokens).item() == pytest.approx(sum(map(sum, hits)) / 8)


def test_test_prompt_prints_the_answers_rank_logit_and_prob(smol_model, theirs, capsys):
    prompt = "The capital of France is"
    utils.test_prompt(prompt, "Paris", smol_model, top_k=3)
    out = capsys.readouterr().out.splitlines()
    ids = theirs(prompt)["input_ids"]
    assert out[0] == f"Tokenized prompt: {[theirs.decode([i]) for i in ids]}"
    assert out[1] == "Tokenized answer: [' Paris']"
    with torch.no_grad():
        logits = smol_model(torch.tensor([ids]))[0, -1].float()
    probs = logits.softmax(-1)
    paris = theirs.convert_tokens_to_ids("ĠParis")
    rank = int((probs > probs[paris]).sum())
    assert out[2] == "Performance on answer token:"
    assert out[3] == f"Rank: {rank: <8} Logit: {logits[paris]:5.2f} Prob: {probs[paris]:6.2%} Token: | Paris|"
    top = int(logits.argmax())
    assert out[4] == f"Top 0th token. Logit: {logits[top]:5.2f} Prob: {probs[top]:6.2%} Token: |{theirs.decode([top])}|"
    assert len(out) == 8 and out[-1] == f"Ranks of the answer tokens: [(' Paris', {rank})]"

    utils.test_prompt(prompt, ["Paris", " London"], smol_model, print_details=False)
    london = theirs.convert_tokens_to_ids("ĠLondon")
    ranks = [(" Paris", rank), (" London", int((probs > probs[london]).sum()))]
    assert capsys.readouterr().out.splitlines() == [f"Ranks of the answer tokens: {[ranks]}"]


def test_tokenize_and_concatenate_joins_documents_with_eos_and_rows_start_with_bos(ours, theirs):
    docs = ["Hello world", "The cat sat on the mat.", "日本 🙂 and more text here"]
    flat = theirs(docs[0], add_special_tokens=False)["input_ids"] + [2] + theirs(docs[1], add_special_tokens=False)[
        "input_ids"] + [2] + theirs(docs[2], add_special_tokens=False)["input_ids"]
    out = utils.tokenize_and_concatenate(docs, ours, max_length=5)["tokens"]
    n = len(flat) // 4
    assert out.tolist() == [[1] + flat[4 * i: 4 * i + 4] for i in range(n)]
    assert torch.equal(utils.tokenize_and_concatenate({"text": docs}, theirs, max_length=5)["tokens"], out)
    short = utils.tokenize_and_concatenate(["hi"], ours, max_length=6, add_bos_token=False)["tokens"]
    assert short.tolist() == [theirs("hi")["input_ids"] + [2] * (6 - len(theirs("hi")["input_ids"]))]


def test_input_to_embed_gives_the_embedding_rows_and_the_mask(smol_model):
    resid, tokens, shortformer, mask = utils.input_to_embed(smol_model, ["Hello world", "a"])
    assert shortformer is None and mask.tolist() == [[1, 1], [0, 1]]  # the tokenizer's side: left
    assert torch.equal(resid, smol_model.embed.weight[tokens])
    resid, tokens, _, mask = utils.input_to_embed(smol_model, tokens[0])
    assert tokens.shape == (1, 2) and mask is None and resid.shape == (1, 2, smol_model.cfg.d_model)


# ---------------------------------------------------------------- the model's TransformerLens text methods
def test_model_text_methods_take_transformer_lens_arguments(smol_model, theirs):
    texts = ["Hi", "The cat sat on the mat"]
    left = smol_model.to_tokens(texts)
    assert left.shape == (2, len(theirs(texts[1])["input_ids"]))
    assert left[0, -1].item() == theirs(texts[0])["input_ids"][-1] and left[0, 0].item() == smol_model.tokenizer.pad_token_id
    right = smol_model.to_tokens(texts, padding_side="right", move_to_device=False)
    assert right[0, 0].item() == theirs(texts[0])["input_ids"][0] and right.device.type == "cpu"
    assert smol_model.to_str_tokens(texts) == [smol_model.to_str_tokens(t) for t in texts]
    ids = theirs(texts[1])["input_ids"]
    assert smol_model.to_str_tokens(np.array(ids)) == smol_model.to_str_tokens(torch.tensor([ids]))
    assert smol_model.to_string(np.array(ids)) == theirs.decode(ids)
    assert smol_model.to_single_str_token(ids[1]) == smol_model.to_str_tokens([ids[1]])[0]
    words = smol_model.to_str_tokens("the cat and the cat")
    assert smol_model.get_token_position(" cat", "the cat and the cat", mode="last") == len(words) - 1 - words[::-1].index(" cat")
    assert smol_model.get_token_position(" cat", "the cat and the cat") == words.index(" cat")
    chunks = list(smol_model.generate_stream("Hi", 5, max_tokens_per_yield=2, stop_at_eos=False))
    whole = smol_model.generate("Hi", 5, stop_at_eos=False, return_type="tokens")
    assert torch.equal(torch.cat(chunks, dim=-1), whole)
