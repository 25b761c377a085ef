"""Interp tools (metrics, data, lens, ablation, steering, neurons, corruption) on a tiny random model.

Identities that must hold exactly, plus comparisons against the obvious hand-written edit."""

from __future__ import annotations

import copy
import warnings
import json
import math

import pytest
import torch
from model_factory import CharTokenizer, random_model

from hookedcot import HookedCoT, ModelConfig, get_act_name
from hookedcot.interp import data as D
from hookedcot.interp import metrics as M
from hookedcot.interp.ablation import (ablate_direction, ablate_heads, ablate_mean, ablate_neurons, ablate_resample,
                                       ablate_zero, activation_mean)
from hookedcot.interp.corruption import add_noise
from hookedcot.interp.lens import run_logit_lens
from hookedcot.interp.neurons import trace_neurons, trace_neurons_while_generating
from hookedcot.interp.positions import Positions
from hookedcot.interp.steering import add_vector, generate_steered, scale_direction
from hookedcot.tokenizer import TokenizerError

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=130,
                  qkv_bias=True, norm_eps=1e-6)


class Tokenizer(CharTokenizer):
    """CharTokenizer raising what hookedcot's tokenizer raises for a multi-token string."""

    def to_single_token(self, text):
        if len(text) != 1:
            raise TokenizerError(f"{text!r} is {len(text)} tokens")
        return ord(text)


@pytest.fixture(scope="module")
def model() -> HookedCoT:
    return random_model(CFG, tokenizer=Tokenizer())


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(32, 127, (2, 10), generator=torch.Generator().manual_seed(1))


def record(store, key):
    def fn(x, hook):
        store[key] = x.clone()
    return fn


# ---------------------------------------------------------------- positions
def test_position_specs():
    pos = torch.arange(10)
    sel = lambda spec: Positions(spec)(pos).nonzero().reshape(-1).tolist()
    assert Positions(None)(pos) is None and Positions("all")(pos) is None
    assert sel([1, -1]) == [1, 9] and sel(3) == [3]
    assert sel("from 7") == [7, 8, 9] and sel("last 2") == [8, 9]
    assert sel(slice(2, 8, 3)) == [2, 5] and sel(slice(-3, None)) == [7, 8, 9]
    assert sel(lambda p: p % 4 == 0) == [0, 4, 8]
    assert Positions("from 3")(torch.tensor([12])).tolist() == [True]  # a generation step
    with pytest.raises(ValueError, match="from N"):
        Positions("after 3")


# ---------------------------------------------------------------- metrics
def test_kl_divergence_formula_and_identities():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 5, 17, generator=g), torch.randn(3, 5, 17, generator=g)
    P, Q = p.softmax(-1), q.softmax(-1)
    by_hand = (P * (P.log() - Q.log())).sum(-1)
    torch.testing.assert_close(M.kl_divergence(p, q), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(M.kl_divergence(p, q, "q||p"), (Q * (Q.log() - P.log())).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(M.kl_divergence(p, q, "symmetric"), M.kl_divergence(p, q) + M.kl_divergence(q, p))
    assert M.kl_divergence(p, q).shape == (3, 5) and bool((M.kl_divergence(p, q) >= 0).all())
    assert torch.equal(M.kl_divergence(p, p), torch.zeros(3, 5))
    assert torch.equal(M.kl_divergence(p, p + 3.0).abs() < 1e-6, torch.ones(3, 5, dtype=torch.bool))
    masked = p.clone(); masked[..., 0] = float("-inf")  # P(0) = 0 contributes nothing, not NaN
    assert torch.isfinite(M.kl_divergence(masked, q)).all()
    with pytest.raises(ValueError, match="direction"):
        M.kl_divergence(p, q, "pq")


def test_simple_metrics_against_hand_values():
    a = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    b = torch.tensor([[1.0, 0.0, 6.0], [0.0, 0.0, 5.0]])
    torch.testing.assert_close(M.l2_distance(a, b), torch.tensor([5.0, 0.0]))
    assert M.top1_changed(a, b).tolist() == [1.0, 0.0]
    assert M.logit_difference(a, 1, 2).tolist() == [1.0, -5.0]
    assert M.logit_difference(a, torch.tensor([1, 2]), torch.tensor([0, 1])).tolist() == [2.0, 5.0]
    assert M.logit_difference(a[None].expand(4, 2, 3), 2, 0).shape == (4, 2)
    torch.testing.assert_close(M.cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 3.0])),
                               torch.tensor(1 / math.sqrt(2)))
    assert M.mean_token_logit_difference(a, [1, 2], [0]).tolist() == [1.5, 2.5]


def test_answer_logprob_teacher_forcing():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 11, generator=g)  # a prompt of 4 tokens + an answer of 2 at positions 4, 5
    answer = torch.tensor([[3, 7], [1, 1]])
    at = M.answer_logits(logits, answer_start=4, n_answer=2)
    assert torch.equal(at, logits[:, 3:5])
    lp = logits.log_softmax(-1)
    by_hand = torch.stack([lp[0, 3, 3] + lp[0, 4, 7], lp[1, 3, 1] + lp[1, 4, 1]])
    torch.testing.assert_close(M.answer_logprob(at, answer), by_hand)
    mask = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(M.answer_logprob(at, answer, mask)[1], lp[1, 3, 1])
    wrong = torch.tensor([[5, 7], [2, 2]])
    torch.testing.assert_close(M.answer_logit_difference(at, answer, wrong), M.answer_logprob(at, answer) - M.answer_logprob(at, wrong))
    other = torch.randn(2, 2, 11, generator=g)
    torch.testing.assert_close(M.answer_logit_difference(at, answer, wrong, corrupted_logits=other),
                               M.answer_logprob(at, answer) - M.answer_logprob(other, wrong))


def test_normalized_recovery_identities_and_nan_policy():
    corrupted, clean = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, -2.0, 3.0])
    r = M.normalized_recovery(clean, corrupted, clean)
    assert r[:2].tolist() == [1.0, 1.0] and math.isnan(r[2])
    assert M.normalized_recovery(corrupted, corrupted, clean)[:2].tolist() == [0.0, 0.0]
    assert M.normalized_recovery(torch.tensor([2.0, 0.0, 9.0]), corrupted, clean)[:2].tolist() == [0.5, 0.5]
    assert not torch.isinf(r).any()
    assert M.normalized_recovery(torch.tensor(9.0), corrupted, clean, on_equal="zero")[2] == 0
    with pytest.raises(ValueError, match="nothing to recover"):
        M.normalized_recovery(clean, corrupted, clean, on_equal="raise")


# ---------------------------------------------------------------- data
def test_generator_is_deterministic_correct_and_corrupts_one_number():
    pairs = D.generate_pairs(40, seed=7)
    assert [(p.clean, p.corrupted) for p in pairs] == [(p.clean, p.corrupted) for p in D.generate_pairs(40, seed=7)]
    assert [p.clean.question for p in pairs] != [p.clean.question for p in D.generate_pairs(40, seed=8)]
    assert len({p.clean.template for p in pairs}) >= 6
    templates = {t.name: t for t in D.TEMPLATES}
    for p in pairs:
        t = templates[p.clean.template]
        assert p.clean.answer == t.answer(p.clean.numbers) and p.corrupted.answer == t.answer(p.corrupted.numbers)
        assert p.answers_differ and p.clean.answer > 0 and p.corrupted.answer > 0
        assert p.clean.reasoning.endswith(f"The answer is {p.clean.answer}.")
        changed = [k for k in p.clean.numbers if p.clean.numbers[k] != p.corrupted.numbers[k]]
        assert len(changed) == 1
        a, b = p.clean.numbers[changed[0]], p.corrupted.numbers[changed[0]]
        assert 1 <= abs(a - b) <= 3 and len(str(a)) == len(str(b))
        assert str(b) in p.corrupted.question


def test_pairs_json_round_trip_and_validation(tmp_path):
    pairs = D.generate_pairs(5, seed=1)
    assert D.load_pairs(D.save_pairs(pairs, tmp_path / "pairs.json")) == pairs
    flat = [{"pair_id": 3, "clean_question": "1+1?", "clean_answer": "2", "corrupted_question": "1+2?", "corrupted_answer": 3}]
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    loaded = D.load_pairs(tmp_path / "flat.json")[0]
    assert (loaded.id, loaded.clean.answer, loaded.corrupted.question) == ("3", 2, "1+2?")
    bad = [{"clean": {"question": "a", "answer": 1}, "corrupted": {"question": "b", "answer": 2}},
           {"id": "x7", "clean": {"question": "a", "answer": "two"}, "corrupted": {"question": "b", "answer": 2}}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"entry 1 \(id 'x7'\), clean: 'answer' must be an integer"):
        D.load_pairs(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps([{"clean": {"answer": 1}, "corrupted": {"question": "b", "answer": 2}}]))
    with pytest.raises(ValueError, match="entry 0, clean: 'question'"):
        D.load_pairs(tmp_path / "bad2.json")
    (tmp_path / "bad3.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="entry 0: needs 'clean'"):
        D.load_pairs(tmp_path / "bad3.json")


def test_prompt_formats_and_same_length_filter(model):
    p = D.generate_pairs(1, seed=0)[0]
    assert D.format_prompt(p.clean) == f"Q: {p.clean.question}\nA:"
    assert D.format_prompt(p.clean, "chat", model=model) == f"<user>{p.clean.question}\n<assistant>"
    with pytest.raises(ValueError, match="needs the model"):
        D.format_prompt(p.clean, "chat")
    longer = D.ProblemPair(p.clean, D.Problem(p.clean.question + " 1", 1))
    pairs = D.generate_pairs(12, seed=3)
    assert D.keep_same_length_pairs(model, pairs + [longer]) == pairs  # digit counts kept: equal lengths


# ---------------------------------------------------------------- logit lens
def test_logit_lens_last_row_is_the_model_and_rows_are_the_lens(model, tokens, tmp_path):
    seq = tokens[:1]
    logits = model(seq)  # (a full cache would take the explicit-attention path: other rounding)
    _, cache = model.run_with_cache(seq, names_filter=lambda n: n.endswith(("resid_pre", "mlp_out")))
    lens = run_logit_lens(model, seq, targets=[5, "a"], top_k=3)
    assert lens.rows == [f"{i}_pre" for i in range(CFG.n_layers)] + ["final_post"]
    lp = logits[0].float().log_softmax(-1)
    assert torch.equal(lens.logit.values[:, -1], logits[0][:, [5, ord("a")]].T.float())
    assert torch.equal(lens.prob.values[:, -1], lp[:, [5, ord("a")]].T.exp())
    top = lp.topk(3, -1)
    assert torch.equal(lens.top_ids[-1], top.indices) and torch.equal(torch.tensor(lens.top_probs[-1]), top.values.exp())
    for layer in range(CFG.n_layers):  # each row = final norm + unembed of that residual
        by_hand = model.unembed(model.ln_final(cache["resid_pre", layer]))[0]
        assert torch.equal(lens.logit.values[0, layer], by_hand[:, 5])
    ranks = lens.rank.values[0, -1]
    assert ranks.tolist() == [float((logits[0, i] > logits[0, i, 5]).sum()) for i in range(seq.shape[1])]
    sub = run_logit_lens(model, seq, targets=5, positions=[2, -1], sources=["resid", "mlp_out"])
    assert sub.positions == [2, 9] and sub.rows[:2] == ["0_pre", "0_mlp_out"] and sub.rows[-1] == "final_post"
    assert torch.equal(sub.logit.values[0, -1], logits[0, [2, 9], 5])
    mlp = model.unembed(model.ln_final(cache["mlp_out", 1][:, [2, 9]]))[0, :, 5]  # own-scale norm
    assert torch.equal(sub.logit.values[0, sub.rows.index("1_mlp_out")], mlp)
    assert sub.position_labels[0] == f"2 {chr(int(seq[0, 2]))!r}" and len(sub.top_tokens[0][1]) == 5
    lens.save(tmp_path); paths = sub.plot(tmp_path)
    assert (tmp_path / "lens_top_k.json").exists() and (tmp_path / "lens_prob.json").exists() and all(p.exists() for p in paths)
    with pytest.warns(UserWarning, match="first token"):
        assert run_logit_lens(model, seq, targets="ab").targets == [ord("a")]


# ---------------------------------------------------------------- ablation
def test_ablate_neurons_equals_zeroing_down_proj_columns(model, tokens):
    neurons = [3, 17, 40]
    hooked = model.run_with_hooks(tokens, fwd_hooks=[ablate_neurons(1, neurons)])
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.blocks[1].mlp.down_proj.weight[:, neurons] = 0
    torch.testing.assert_close(hooked, edited(tokens), rtol=1e-6, atol=1e-6)
    acts = {}
    model.run_with_hooks(tokens, fwd_hooks=[ablate_neurons(1, neurons, positions=[2, -1]),
                                           (get_act_name("post", 1), record(acts, "post"))])
    _, cache = model.run_with_cache(tokens, names_filter=get_act_name("post", 1))
    expected = cache["post", 1].clone()
    expected[:, 2, neurons] = 0; expected[:, 9, neurons] = 0
    assert torch.equal(acts["post"], expected)


def test_ablate_zero_and_ablate_heads_touch_only_the_selection(model, tokens):
    acts = {}
    name = get_act_name("z", 2)
    model.run_with_hooks(tokens, fwd_hooks=[ablate_heads(2, [1, 3], positions="from 6"), (name, record(acts, "z"))])
    _, cache = model.run_with_cache(tokens, names_filter=name)
    expected = cache[name].clone(); expected[:, 6:, [1, 3]] = 0
    assert torch.equal(acts["z"], expected)
    pat = get_act_name("pattern", 0)
    model.run_with_hooks(tokens, fwd_hooks=[ablate_zero(pat, heads=2, positions=[4]), (pat, record(acts, "p"))])
    assert bool((acts["p"][:, 2, 4] == 0).all()) and bool((acts["p"][:, 2, 5] != 0).any())
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[ablate_zero("blocks.0.hook_mlp_out", positions=[])]), model(tokens))


def test_ablate_direction_leaves_activations_orthogonal(model, tokens):
    v = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(3))
    name, acts = get_act_name("resid_post", 1), {}
    model.run_with_hooks(tokens, fwd_hooks=[ablate_direction(name, v, positions=[0, 1, 2]), (name, record(acts, "r"))])
    _, cache = model.run_with_cache(tokens, names_filter=name)
    dots = acts["r"] @ (v / v.norm())
    assert dots[:, :3].abs().max() < 1e-5 and dots[:, 3:].abs().min() > 1e-3
    assert torch.equal(acts["r"][:, 3:], cache[name][:, 3:])
    torch.testing.assert_close(acts["r"][:, :3], cache[name][:, :3] - (cache[name][:, :3] @ (v / v.norm()))[..., None] * (v / v.norm()))


def test_ablate_mean_equals_the_manual_mean(model, tokens):
    name = get_act_name("mlp_out", 0)
    texts = ["Q: 12 apples?", "Q: 3 pears and 4?", "hello"]  # different lengths: padding must be skipped
    rows = [model.run_with_cache(t, names_filter=name)[1][name][0] for t in texts]
    manual = torch.cat(rows).mean(0)
    torch.testing.assert_close(activation_mean(model, name, texts), manual, rtol=1e-5, atol=1e-6)
    acts = {}
    model.run_with_hooks(tokens, fwd_hooks=[ablate_mean(model, name, texts, positions=[1]), (name, record(acts, "m"))])
    torch.testing.assert_close(acts["m"][:, 1], manual.expand(2, -1), rtol=1e-5, atol=1e-6)
    assert torch.equal(acts["m"][:, 2:], model.run_with_cache(tokens, names_filter=name)[1][name][:, 2:])
    same_len = tokens  # per-position: the mean over rows at each position
    per_pos = activation_mean(model, name, same_len, per_position=True)
    torch.testing.assert_close(per_pos, model.run_with_cache(same_len, names_filter=name)[1][name].mean(0))
    acts.clear()
    prompt = tokens[:1, :4]
    model.generate(prompt, 8, stop_at_eos=False, fwd_hooks=[
        ablate_mean(model, name, same_len, per_position=True), (name, lambda x, h: acts.setdefault(int(h.positions[-1]), x.clone()))])
    torch.testing.assert_close(acts[6][0, 0], per_pos[6])  # generation step at position 6
    torch.testing.assert_close(acts[10][0, 0], per_pos.mean(0))  # past the dataset: overall mean


def test_ablate_resample_is_seeded_and_takes_sources_positions(model, tokens):
    name = get_act_name("resid_pre", 2)
    sources = torch.randint(32, 127, (3, 10), generator=torch.Generator().manual_seed(9))
    src = model.run_with_cache(sources, names_filter=name)[1][name]
    acts = {}
    model.run_with_hooks(tokens, fwd_hooks=[ablate_resample(model, name, sources, seed=4, positions=[5, 6]), (name, record(acts, "a"))])
    first = acts["a"].clone()
    model.run_with_hooks(tokens, fwd_hooks=[ablate_resample(model, name, sources, seed=4, positions=[5, 6]), (name, record(acts, "a"))])
    assert torch.equal(first, acts["a"])
    for row in range(2):
        assert any(torch.equal(first[row, 5:7], src[s, 5:7]) for s in range(3))
    assert torch.equal(first[:, :5], model.run_with_cache(tokens, names_filter=name)[1][name][:, :5])


# ---------------------------------------------------------------- steering and noise
def test_zero_steering_and_zero_noise_are_the_identity(model, tokens):
    base = model(tokens)
    v = torch.randn(CFG.d_model) * 10
    for pair in (add_vector("blocks.1.hook_resid_post", v, alpha=0.0), scale_direction("blocks.1.hook_resid_post", v, 1.0),
                 add_noise("hook_embed", 0.0, seed=1), add_noise("blocks.0.hook_resid_post", 0.0, positions=[2])):
        assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[pair]), base)


def test_add_vector_and_scale_direction_match_hand_edits(model, tokens):
    name, v, acts = "blocks.1.hook_resid_post", torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(5)), {}
    _, cache = model.run_with_cache(tokens, names_filter=name)
    model.run_with_hooks(tokens, fwd_hooks=[add_vector(name, v, 2.5, positions=slice(3, 6)), (name, record(acts, "x"))])
    expected = cache[name].clone(); expected[:, 3:6] += 2.5 * v
    assert torch.equal(acts["x"], expected)
    model.run_with_hooks(tokens, fwd_hooks=[scale_direction(name, v, 0.0), (name, record(acts, "y"))])
    assert (acts["y"] @ (v / v.norm())).abs().max() < 1e-5


def test_steering_during_generation(model):
    prompt = "Q: 7+5?\nA:"
    v = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(4)) * 20
    base = model.generate(prompt, 6, stop_at_eos=False)
    assert generate_steered(model, prompt, add_vector("blocks.1.hook_resid_post", v, 0.0), max_new_tokens=6, stop_at_eos=False) == base
    n = len(prompt)
    steered = generate_steered(model, prompt, [add_vector("blocks.1.hook_resid_post", v, 1.0, positions=f"from {n}")],
                             max_new_tokens=6, stop_at_eos=False)
    assert steered != base and steered[: n + 1] == base[: n + 1]  # the first new token comes from the prompt


def test_add_noise_is_seeded_and_per_position(model, tokens):
    acts = {}

    def run(seq, pair):
        model.run_with_hooks(seq, fwd_hooks=[pair, ("hook_embed", record(acts, "e"))])
        return acts["e"]

    clean = model.W_E[tokens]
    a = run(tokens, add_noise("hook_embed", 1.0, seed=3))
    assert torch.equal(a, run(tokens, add_noise("hook_embed", 1.0, seed=3)))
    assert not torch.equal(a, run(tokens, add_noise("hook_embed", 1.0, seed=4)))
    assert torch.equal(run(tokens[:, :6], add_noise("hook_embed", 1.0, seed=3)), a[:, :6])  # position t's noise is fixed
    some = run(tokens, add_noise("hook_embed", 1.0, positions=[1, 7], seed=3))
    assert torch.equal(some[:, [1, 7]], a[:, [1, 7]]) and torch.equal(some[:, [0, 2, 9]], clean[:, [0, 2, 9]])
    rel = run(tokens, add_noise("hook_embed", 2.0, seed=3, relative_to_embedding_std=True, model=model))
    torch.testing.assert_close(rel - clean, 2.0 * float(model.W_E.detach().std()) * (a - clean), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- neurons
def test_neuron_traces(model, tokens):
    seq = tokens[:1]
    _, cache = model.run_with_cache(seq, names_filter=get_act_name("post", 2))
    r = trace_neurons(model, seq, 2, 11)
    assert r.axes == ("position",) and torch.equal(r.values, cache["post", 2][0, :, 11])
    assert r.labels["position"][3] == f"3 {chr(int(seq[0, 3]))!r}"
    both = trace_neurons(model, seq, 2, [11, 12])
    assert both.values.shape == (2, 10) and torch.equal(both.values[0], r.values)
    g = trace_neurons_while_generating(model, seq, 2, 11, max_new_tokens=5, stop_at_eos=False)
    full = torch.tensor(g.meta["tokens"])
    assert g.values.shape == (10 + 5 - 1,) and g.meta["prompt_len"] == 10
    torch.testing.assert_close(g.values, trace_neurons(model, full[:-1], 2, 11).values, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- old names
def _hooked(pair_of):
    return lambda f, model, tokens: model.run_with_hooks(tokens, fwd_hooks=[pair_of(f, model, tokens)])


_V = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(8))
DEPRECATED = {  # old name -> (new name, how to call either and get something comparable)
    "zero_ablation": ("ablate_zero", _hooked(lambda f, m, t: f("blocks.1.hook_mlp_out", positions=[2]))),
    "mean_ablation": ("ablate_mean", _hooked(lambda f, m, t: f(m, "blocks.1.hook_mlp_out", t, positions="last 3"))),
    "resample_ablation": ("ablate_resample", _hooked(lambda f, m, t: f(m, "blocks.1.hook_resid_pre", t.flip(0), seed=2))),
    "neuron_ablation": ("ablate_neurons", _hooked(lambda f, m, t: f(1, [3, 4]))),
    "head_ablation": ("ablate_heads", _hooked(lambda f, m, t: f(2, [0], positions="from 5"))),
    "direction_ablation": ("ablate_direction", _hooked(lambda f, m, t: f("blocks.0.hook_resid_post", _V))),
    "gaussian_noise": ("add_noise", _hooked(lambda f, m, t: f("hook_embed", 1.0, positions=[1, 2], seed=5))),
    "steer_generate": ("generate_steered", lambda f, m, t: f(m, "Q: 1+1?", add_vector("blocks.1.hook_resid_post", _V),
                                                             max_new_tokens=3, stop_at_eos=False)),
    "neuron_trace": ("trace_neurons", lambda f, m, t: f(m, t[:1], 1, [5, 6]).values),
    "neuron_trace_generate": ("trace_neurons_while_generating",
                              lambda f, m, t: f(m, t[:1], 1, 5, max_new_tokens=3, stop_at_eos=False).values),
    "logit_lens": ("run_logit_lens", lambda f, m, t: f(m, t[:1], targets=5, positions="last 2").logit.values),
    "same_length_pairs": ("keep_same_length_pairs", lambda f, m, t: f(m, D.generate_pairs(4, seed=1))),
}


@pytest.mark.parametrize("old", list(DEPRECATED))
def test_old_names_warn_with_the_new_name_and_give_the_same_result(old, model, tokens):
    import hookedcot.interp as interp

    new, call = DEPRECATED[old]
    with pytest.warns(DeprecationWarning, match=new):
        before = call(getattr(interp, old), model, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        after = call(getattr(interp, new), model, tokens)
    assert torch.equal(before, after) if isinstance(before, torch.Tensor) else before == after


def test_lens_old_components_keyword_and_constant_still_work(model, tokens):
    from hookedcot.interp import lens

    with pytest.warns(DeprecationWarning, match="run_logit_lens"):
        old = lens.logit_lens(model, tokens[:1], targets=5, components=["mlp_out"])
    assert old.rows == run_logit_lens(model, tokens[:1], targets=5, sources=["mlp_out"]).rows == ["0_mlp_out", "1_mlp_out", "2_mlp_out"]
    with pytest.warns(DeprecationWarning, match="LENS_SOURCES"):
        assert lens.COMPONENTS == lens.LENS_SOURCES
