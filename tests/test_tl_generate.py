"""`generate` with TransformerLens' options, embeddings in, and `generate_stream`, on SmolLM2.

Oracles: a plain forward over the generated ids (each step's logits, greedy choices), the
embedding matrix indexed by hand (return_type="embeds"), and generation from token ids (the same
prompt given as embeddings must continue the same way)."""

from __future__ import annotations

import pytest
import torch

from hookedcot.generate import GenerateOutput, generate_stream

PROMPT = "The capital of France is"
PROMPTS = ["One, two, three,", "Once upon a time there was a"]


@pytest.fixture(scope="module")
def model(smol_model):
    return smol_model


@pytest.fixture(scope="module")
def prompt_ids(model):
    return model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def greedy(model, prompt_ids):
    return model.generate(prompt_ids, 6, stop_at_eos=False)


def test_use_past_kv_cache_false_equals_true(model, prompt_ids, greedy):
    assert torch.equal(model.generate(prompt_ids, 6, stop_at_eos=False, use_past_kv_cache=True), greedy)
    assert torch.equal(model.generate(prompt_ids, 6, stop_at_eos=False, use_past_kv_cache=False), greedy)
    batch = model.generate(PROMPTS, 4, stop_at_eos=False, use_past_kv_cache=False)
    assert batch == model.generate(PROMPTS, 4, stop_at_eos=False, use_past_kv_cache=True)
    with pytest.raises(ValueError, match="disagree"):
        model.generate(prompt_ids, 2, use_cache=True, use_past_kv_cache=False)


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_output_logits_equal_a_forward_over_the_generated_tokens(model, prompt_ids, greedy, use_past_kv_cache):
    out = model.generate(prompt_ids, 6, stop_at_eos=False, output_logits=True, use_past_kv_cache=use_past_kv_cache)
    assert isinstance(out, GenerateOutput) and out["logits"] is out.logits
    assert torch.equal(out.sequences, greedy)
    p0 = prompt_ids.shape[1]
    assert len(out.logits) == 6 and out.logits[0].shape == (1, model.cfg.d_vocab)
    with torch.no_grad():
        full = model(out.sequences)
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step, full[:, p0 - 1 + i], atol=2e-4, rtol=1e-4)
        assert int(step.argmax(-1)) == int(out.sequences[0, p0 + i])


def test_a_string_gives_a_string_a_list_a_list_and_return_type_overrides(model, greedy):
    text = model.generate(PROMPT, 6, stop_at_eos=False)
    assert isinstance(text, str) and text.startswith(PROMPT)
    assert text == model.tokenizer.decode(greedy[0])
    assert torch.equal(model.generate(PROMPT, 6, stop_at_eos=False, return_type="tokens"), greedy)
    texts = model.generate(PROMPTS, 3, stop_at_eos=False)
    assert isinstance(texts, list) and len(texts) == 2 and all(t.startswith(p) for t, p in zip(texts, PROMPTS))
    assert model.generate(greedy[:, :-6], 6, stop_at_eos=False, return_type="str") == text  # one row: a str (TL)
    two = torch.cat([greedy[:, :-6]] * 2)
    assert model.generate(two, 6, stop_at_eos=False, return_type="str") == [text, text]


def test_return_type_embeds_is_the_embedding_matrix_indexed_by_the_sequence(model, greedy):
    embeds = model.generate(PROMPT, 6, stop_at_eos=False, return_type="embeds")
    assert torch.equal(embeds, model.embed.weight.detach()[greedy])


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_embeddings_in_continue_as_the_same_token_ids_do(model, prompt_ids, greedy, use_past_kv_cache):
    prompt_embeds = model.embed.weight.detach()[prompt_ids].detach().clone()
    p0 = prompt_ids.shape[1]
    kw = dict(stop_at_eos=False, use_past_kv_cache=use_past_kv_cache)
    new = model.generate(prompt_embeds, 6, **kw)  # return_type "input": the embeddings, then the new tokens'
    assert new.shape == (1, p0 + 6, model.cfg.d_model)
    assert torch.equal(new[:, :p0], prompt_embeds) and torch.equal(new[:, p0:], model.embed.weight.detach()[greedy[:, p0:]])
    assert torch.equal(model.generate(prompt_embeds, 6, return_type="tokens", **kw), greedy[:, p0:])
    assert model.generate(prompt_embeds, 6, return_type="str", **kw) == model.tokenizer.decode(greedy[0, p0:])
    with pytest.raises(ValueError, match="embeddings must be"):
        model.generate(prompt_embeds[0], 2)


def test_temperature_zero_is_greedy_and_freq_penalty_forbids_repeats(model, prompt_ids, greedy):
    assert torch.equal(model.generate(prompt_ids, 6, stop_at_eos=False, do_sample=True, temperature=0.0), greedy)
    out = model.generate(prompt_ids, 8, stop_at_eos=False, do_sample=True, freq_penalty=1e4, seed=0)
    seen = out[0].tolist()
    assert len(set(seen)) == len(seen)  # no new token repeats the prompt or an earlier new token
    baseline = model.generate(prompt_ids, 8, stop_at_eos=False, do_sample=True, seed=0)
    assert torch.equal(model.generate(prompt_ids, 8, stop_at_eos=False, do_sample=True, freq_penalty=0.0, seed=0),
                       baseline)


def test_generate_stream_yields_chunks_that_add_up_to_generate(model, prompt_ids, greedy):
    seen = []
    hook = ("blocks.0.hook_resid_pre", lambda x, h: seen.append(x.shape[1]))
    chunks = []
    for chunk in generate_stream(model, prompt_ids, 6, max_tokens_per_yield=4, stop_at_eos=False, fwd_hooks=[hook]):
        assert model.active_hook_names() == []  # hooks live only while a step runs
        chunks.append(chunk)
    p0 = prompt_ids.shape[1]
    assert [c.shape[1] for c in chunks] == [p0 + 4, 2]  # the prompt comes first, as in TransformerLens
    assert torch.equal(torch.cat(chunks, 1), greedy)
    assert seen == [p0] + [1] * 5
    pieces = list(generate_stream(model, PROMPT, 6, max_tokens_per_yield=2, stop_at_eos=False, return_type="str"))
    assert len(pieces) == 3 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == model.generate(PROMPT, 6, stop_at_eos=False)


def test_generate_stream_stops_at_eos_and_flushes_the_rest(model, prompt_ids, greedy):
    p0 = prompt_ids.shape[1]
    stop = int(greedy[0, p0 + 2])
    chunks = list(generate_stream(model, prompt_ids, 6, max_tokens_per_yield=25, eos_token_id=stop))
    assert len(chunks) == 1 and torch.equal(chunks[0], greedy[:, : p0 + 3])
