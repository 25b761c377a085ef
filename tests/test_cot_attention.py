"""Attention anatomy and attention suppression (hookedcot.cot.attention / .suppression) against
oracles that share no code with them: the dense pattern of `run_with_cache` averaged by a Python
loop; vertical scores and kurtosis in plain numpy; suppression as one full forward per step with
a masked `attention_mask`, or a hand-written -inf hook on `hook_attn_scores`, and KL by hand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hookedcot import HookedCoT
from hookedcot.cot import suppression as suppression_module
from hookedcot.cot.attention import StepAttention, step_attention
from hookedcot.cot.suppression import SuppressionResult, suppress_steps, suppressed_logits

GQA_QUIRKS = ["qwen2", "llama32", "smollm2_like"]  # 2:1, 4:1 and 3:1 query heads per kv head
LENGTH = 41
# a prompt (0-3), steps that tile the reasoning with an empty one among them, then an answer (38-41)
SPANS = [(3, 8), (8, 8), (8, 15), (15, 22), (22, 23), (23, 30), (30, 38)]
KL_TOL = dict(rtol=1e-4, atol=1e-7)  # float32 log-probs put a floor of ~1e-8 under any KL


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    cache = {}

    def get(quirk: str) -> HookedCoT:
        if quirk not in cache:
            cache[quirk] = HookedCoT.from_pretrained(tiny_checkpoints[quirk]).eval()
        return cache[quirk]

    return get


def trace(vocab: int, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- oracles
def dense_block_means(model, spans, layers=None, **run) -> np.ndarray:
    """[layers, heads, S, S]: every layer's full pattern from run_with_cache, averaged block by block."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    _, cache = model.run_with_cache(**run, names_filter=lambda n: n.endswith("hook_pattern"))
    out = np.full((len(layers), model.cfg.n_heads, len(spans), len(spans)), np.nan)
    for li, layer in enumerate(layers):
        pattern = cache["pattern", layer][0].double().numpy()  # h q k
        for h in range(model.cfg.n_heads):
            for i, (qa, qb) in enumerate(spans):
                for j, (ka, kb) in enumerate(spans):
                    if qb > qa and kb > ka:
                        out[li, h, i, j] = pattern[h, qa:qb, ka:kb].mean()
    return out


def naive_vertical(matrix: np.ndarray, k: int) -> np.ndarray:
    n = matrix.shape[-1]
    out = np.full(matrix.shape[:-2] + (n,), np.nan)
    for idx in np.ndindex(matrix.shape[:-2]):
        for j in range(n):
            values = [matrix[idx + (i, j)] for i in range(j + k, n) if not np.isnan(matrix[idx + (i, j)])]
            if values:
                out[idx + (j,)] = sum(values) / len(values)
    return out


def naive_kurtosis(values: np.ndarray) -> float:
    x = values[~np.isnan(values)]
    if len(x) == 0:
        return np.nan
    mean = x.mean()
    m2, m4 = ((x - mean) ** 2).mean(), ((x - mean) ** 4).mean()
    return np.nan if m2 == 0 else m4 / m2**2 - 3.0


def kl_rows(model, logits_p, logits_q, spans, i) -> list[float]:
    """Mean KL(p || q) over each step j > i's positions, NaN for j <= i and empty steps."""
    lp, lq = logits_p.log_softmax(-1).double(), logits_q.log_softmax(-1).double()
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return [float(kl[a:b].mean()) if j > i and b > a else float("nan") for j, (a, b) in enumerate(spans)]


def masked_forward_matrix(model, tokens, spans) -> torch.Tensor:
    """One full forward per step with its keys zeroed in attention_mask (position ids explicit)."""
    with torch.no_grad():
        base = model(tokens)[0]
        rows = []
        for i, (a, b) in enumerate(spans):
            mask = torch.ones(1, len(tokens), dtype=torch.long)
            mask[0, a:b] = 0
            masked = model(tokens, attention_mask=mask, position_ids=torch.arange(len(tokens))[None])[0]
            rows.append(kl_rows(model, base, masked, spans, i))
    return torch.tensor(rows, dtype=torch.float32)


def hook_oracle_matrix(model, tokens, spans, heads_by_layer) -> torch.Tensor:
    """One full forward per step, a hand-written hook setting the chosen heads' scores at the step's
    keys to -inf for queries after the step."""
    with torch.no_grad():
        base = model(tokens)[0]
        rows = []
        for i, (a, b) in enumerate(spans):
            def hide(scores, hook, a=a, b=b):
                scores = scores.clone()
                for h in heads_by_layer[hook.layer()]:
                    scores[:, h, b:, a:b] = float("-inf")
                return scores

            hooks = [(f"blocks.{layer}.attn.hook_attn_scores", hide) for layer in heads_by_layer]
            masked = model.run_with_hooks(tokens, fwd_hooks=hooks)[0]
            rows.append(kl_rows(model, base, masked, spans, i))
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- step × step attention
@pytest.mark.parametrize("spans", [SPANS, [(2, 2), (4, 9), (9, 9), (12, 30), (30, 41)]], ids=["tiled", "empty-first-and-a-gap"])
@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
@pytest.mark.parametrize("quirk", GQA_QUIRKS)
def test_step_matrix_equals_the_dense_pattern_averaged_block_by_block(tiny, quirk, chunk, spans):
    model = tiny(quirk)
    tokens = trace(model.cfg.d_vocab)
    att = step_attention(model, tokens=tokens, spans=spans, query_chunk=chunk)
    expected = dense_block_means(model, spans, input=tokens)
    assert att.matrix.shape == (model.cfg.n_layers, model.cfg.n_heads, len(spans), len(spans))
    assert att.matrix.dtype == torch.float32
    np.testing.assert_allclose(att.matrix.numpy(), expected, rtol=1e-5, atol=1e-7)  # NaN where expected is
    empty = [i for i, (a, b) in enumerate(spans) if a == b]
    assert att.matrix[:, :, empty].isnan().all() and att.matrix[:, :, :, empty].isnan().all()


def test_step_matrix_of_the_real_model_equals_its_dense_pattern_on_chosen_layers(smol_model):
    tokens = trace(30000, length=70, seed=4)
    spans = [(5, 17), (17, 30), (30, 31), (31, 52), (52, 66)]
    att = step_attention(smol_model, tokens=tokens[None], spans=spans, layers=[29, 0, -16], query_chunk=13)
    assert att.layers == [0, 14, 29]
    expected = dense_block_means(smol_model, spans, layers=[0, 14, 29], input=tokens)
    np.testing.assert_allclose(att.matrix.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_a_cot_like_object_is_read_through_its_steps_and_runs_on_its_embeddings(tiny):
    model = tiny("smollm2_like")
    tokens = trace(model.cfg.d_vocab)
    steps = [SimpleNamespace(index=n, text=f"step {n} text", tokens=span) for n, span in enumerate(SPANS)]
    cot = SimpleNamespace(tokens=tokens.tolist(), steps=steps, embeds=None)
    from_cot = step_attention(model, cot, query_chunk=6)
    same = step_attention(model, tokens=tokens, spans=SPANS, query_chunk=6).matrix
    torch.testing.assert_close(from_cot.matrix, same, rtol=0, atol=0, equal_nan=True)
    assert from_cot.texts == [s.text for s in steps]
    cot.embeds = model.W_E[tokens][None] * 1.7  # latent positions: no token stands for these vectors
    on_embeds = step_attention(model, cot, query_chunk=6)
    expected = dense_block_means(model, SPANS, inputs_embeds=cot.embeds)
    np.testing.assert_allclose(on_embeds.matrix.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(on_embeds.matrix.numpy(), from_cot.matrix.numpy(), equal_nan=True)


def test_step_attention_leaves_the_forward_on_its_fused_path_and_no_hooks_behind(tiny, monkeypatch):
    model = tiny("qwen2")
    explicit = []
    for block in model.blocks:
        original = block.attn._explicit
        monkeypatch.setattr(block.attn, "_explicit", lambda *a, f=original: explicit.append(1) or f(*a))
    step_attention(model, tokens=trace(model.cfg.d_vocab), spans=SPANS)
    assert not explicit
    assert model.active_hook_names() == []


def random_result(seed: int = 0) -> StepAttention:
    """A lower-triangular random step matrix with an empty step (NaN row and column)."""
    gen = torch.Generator().manual_seed(seed)
    n = 12
    matrix = torch.rand(3, 5, n, n, generator=gen) ** 4  # heavy-tailed columns
    matrix = matrix.tril()
    matrix[:, :, 3], matrix[:, :, :, 3] = float("nan"), float("nan")
    matrix[1, 2] = 0.25 * torch.tril(torch.ones(n, n))  # a flat head: its kurtosis is undefined
    spans = [(i, i + 1) for i in range(n)]
    return StepAttention(matrix, [2, 5, 7], spans, [f"t{i}" for i in range(n)])


@pytest.mark.parametrize("k", [1, 4, 9, 12])
def test_vertical_scores_and_kurtosis_equal_a_naive_numpy_implementation(k):
    att = random_result()
    vertical = naive_vertical(att.matrix.double().numpy(), k)
    np.testing.assert_allclose(att.vertical_scores(k).numpy(), vertical, rtol=1e-6, equal_nan=True)
    kurt = np.array([[naive_kurtosis(vertical[layer, h]) for h in range(5)] for layer in range(3)])
    np.testing.assert_allclose(att.kurtosis(k).numpy(), kurt, rtol=1e-5, atol=1e-6, equal_nan=True)
    if k == 12:
        assert np.isnan(att.vertical_scores(k).numpy()).all()  # no step is 12 steps after another


def test_kurtosis_matches_the_textbook_value_of_a_known_sample():
    att = StepAttention(torch.zeros(1, 1, 1, 1), [0], [(0, 1)])
    from hookedcot.cot.attention import excess_kurtosis

    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, float("nan"), 10.0]])
    # mean 4, deviations -3 -2 -1 0 6: m2 = 50 / 5 = 10, m4 = (81 + 16 + 1 + 0 + 1296) / 5 = 278.8
    assert float(excess_kurtosis(x)[0]) == pytest.approx(278.8 / 100 - 3)
    assert att.receiver_heads() == []  # one step: nothing is k later, no kurtosis


def test_receiver_heads_are_the_top_k_heads_by_kurtosis_and_k_is_clamped(tiny):
    att = random_result()
    kurt = att.kurtosis(4).numpy()
    ranked = sorted(((att.layers[li], h, kurt[li, h]) for li in range(3) for h in range(5)
                     if not np.isnan(kurt[li, h])), key=lambda t: -t[2])
    top = att.receiver_heads(top_k=4)
    assert [(layer, h) for layer, h, _ in top] == [(layer, h) for layer, h, _ in ranked[:4]]
    assert [v for *_, v in top] == sorted((v for *_, v in top), reverse=True)
    everything = att.receiver_heads(top_k=1000)
    assert len(everything) == 14 and (5, 2) not in [(layer, h) for layer, h, _ in everything]  # the flat head
    mean = np.mean([att.head(layer, h).numpy() for layer, h, _ in top], axis=0)
    np.testing.assert_allclose(att.receiver_matrix(top_k=4).numpy(), mean, rtol=1e-6, equal_nan=True)


def test_step_attention_round_trips_through_json_and_draws_its_plots(tmp_path):
    att = random_result()
    back = StepAttention.from_dict(json.loads(json.dumps(att.to_dict(), allow_nan=False)))
    assert torch.equal(back.matrix.isnan(), att.matrix.isnan())
    assert torch.equal(back.matrix.nan_to_num(), att.matrix.nan_to_num())
    assert (back.layers, back.spans, back.texts) == (att.layers, att.spans, att.texts)
    for path in (att.plot_heatmap(tmp_path / "a.png"), att.plot_heatmap(tmp_path / "b.png", layer=5, head=1),
                 att.plot_vertical(tmp_path / "c.png"), att.plot_vertical(tmp_path / "d.png", [f"s{i}" for i in range(12)],
                                                                          layer=2, head=0)):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="layer 3 was not analysed"):
        att.plot_heatmap(tmp_path / "e.png", layer=3, head=0)


# ---------------------------------------------------------------- suppression
def test_suppressing_an_empty_step_changes_nothing(tiny):
    model = tiny("llama32")
    tokens = trace(model.cfg.d_vocab)
    result = suppress_steps(model, tokens=tokens, spans=SPANS, steps=[1])
    assert (result.matrix[1, 2:] == 0).all() and result.matrix[1, :2].isnan().all()
    assert result.matrix[[0, *range(2, len(SPANS))]].isnan().all()
    with torch.no_grad():
        assert torch.equal(suppressed_logits(model, tokens=tokens, spans=SPANS, step=1), model(tokens)[0])


@pytest.mark.parametrize("quirk", GQA_QUIRKS + ["llama_bias"])
def test_suppression_reusing_the_cache_equals_a_full_masked_forward_per_step(tiny, quirk):
    model = tiny(quirk)
    tokens = trace(model.cfg.d_vocab, seed=1)
    result = suppress_steps(model, tokens=tokens, spans=SPANS)
    expected = masked_forward_matrix(model, tokens, SPANS)
    torch.testing.assert_close(result.matrix, expected, equal_nan=True, **KL_TOL)
    assert (result.matrix.nan_to_num() > 1e-4).sum() >= 5  # suppression does something, far above the tolerance
    assert result.steps == list(range(len(SPANS))) and result.sites is None


def test_suppression_equals_a_hand_written_minus_infinity_hook_on_every_head(tiny):
    model = tiny("smollm2_like")
    tokens = trace(model.cfg.d_vocab, seed=2)
    every = {layer: range(model.cfg.n_heads) for layer in range(model.cfg.n_layers)}
    expected = hook_oracle_matrix(model, tokens, SPANS, every)
    torch.testing.assert_close(suppress_steps(model, tokens=tokens, spans=SPANS).matrix, expected, equal_nan=True, **KL_TOL)
    all_heads = suppress_steps(model, tokens=tokens, spans=SPANS, heads=list(range(model.cfg.n_heads)))
    assert all_heads.sites == {layer: list(range(model.cfg.n_heads)) for layer in range(model.cfg.n_layers)}
    torch.testing.assert_close(all_heads.matrix, expected, equal_nan=True, **KL_TOL)


def test_suppressing_chosen_heads_equals_a_hook_oracle_on_those_heads_only(tiny):
    model = tiny("llama32")
    tokens = trace(model.cfg.d_vocab, seed=3)
    result = suppress_steps(model, tokens=tokens, spans=SPANS, heads=[(1, 5), (0, 2), (0, 7)])
    assert result.sites == {0: [2, 7], 1: [5]}
    expected = hook_oracle_matrix(model, tokens, SPANS, {0: [2, 7], 1: [5]})
    torch.testing.assert_close(result.matrix, expected, equal_nan=True, **KL_TOL)
    layer_only = suppress_steps(model, tokens=tokens, spans=SPANS, layers=[1], heads=[0, 3])
    torch.testing.assert_close(layer_only.matrix, hook_oracle_matrix(model, tokens, SPANS, {1: [0, 3]}),
                               equal_nan=True, **KL_TOL)


@pytest.mark.parametrize("heads", [None, [(0, 1), (1, 0)]])
def test_suppressing_a_step_never_changes_the_logits_before_it(tiny, heads):
    model = tiny("qwen2")
    tokens = trace(model.cfg.d_vocab, seed=5)
    # the same attention path as the suppressed run: fused for the mask, explicit where a head hook listens
    listen = [] if heads is None else [(f"blocks.{layer}.attn.hook_attn_scores", lambda x, hook: None) for layer in (0, 1)]
    with torch.no_grad():
        base = model.run_with_hooks(tokens, fwd_hooks=listen)[0]
    for step, (a, b) in enumerate(SPANS):
        if b == a:
            continue
        logits = suppressed_logits(model, tokens=tokens, spans=SPANS, step=step, heads=heads)
        if heads is None:  # the mask hides the step from its own later tokens too; SDPA: a bool mask vs is_causal
            torch.testing.assert_close(logits[:a], base[:a], rtol=1e-6, atol=1e-5)
        else:  # a head hook hides it from the queries after it, and nothing else moves by a bit
            torch.testing.assert_close(logits[:b], base[:b], rtol=0, atol=0)
        if b < LENGTH:
            assert (logits[b:] - base[b:]).abs().max() > 1e-3


def test_suppressing_some_steps_fills_their_rows_with_the_values_of_the_full_run(tiny):
    model = tiny("llama_bias")
    tokens = trace(model.cfg.d_vocab, seed=6)
    full = suppress_steps(model, tokens=tokens, spans=SPANS)
    some = suppress_steps(model, tokens=tokens, spans=SPANS, steps=[5, 0, 3])
    assert some.steps == [0, 3, 5]
    torch.testing.assert_close(some.matrix[[0, 3, 5]], full.matrix[[0, 3, 5]], equal_nan=True, **KL_TOL)
    assert some.matrix[[1, 2, 4, 6]].isnan().all()


def test_a_large_reference_is_unembedded_again_chunk_by_chunk_with_the_same_result(tiny, monkeypatch):
    model = tiny("qwen2")
    tokens = trace(model.cfg.d_vocab, seed=7)
    kept = suppress_steps(model, tokens=tokens, spans=SPANS)
    monkeypatch.setattr(suppression_module, "KEEP_REFERENCE_ELEMENTS", 0)
    again = suppress_steps(model, tokens=tokens, spans=SPANS, chunk=3)
    torch.testing.assert_close(again.matrix, kept.matrix, equal_nan=True, **KL_TOL)


def test_suppression_on_the_real_model_equals_a_full_masked_forward(smol_model):
    tokens = trace(30000, length=64, seed=8)
    spans = [(4, 14), (14, 25), (25, 25), (25, 40), (40, 52), (52, 60)]
    result = suppress_steps(smol_model, tokens=tokens, spans=spans)
    torch.testing.assert_close(result.matrix, masked_forward_matrix(smol_model, tokens, spans), equal_nan=True,
                               rtol=1e-3, atol=1e-7)


def test_suppression_result_round_trips_through_json_and_draws_its_plot(tiny, tmp_path):
    model = tiny("smollm2_like")
    steps = [SimpleNamespace(index=n, text=f"step {n}", tokens=span) for n, span in enumerate(SPANS)]
    cot = SimpleNamespace(tokens=trace(model.cfg.d_vocab).tolist(), steps=steps, embeds=None)
    result = suppress_steps(model, cot, heads=[(0, 1)])
    back = SuppressionResult.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False)))
    assert torch.equal(back.matrix.nan_to_num(), result.matrix.nan_to_num())
    assert (back.steps, back.spans, back.texts, back.sites) == (result.steps, result.spans, result.texts, {0: [1]})
    for log in (False, True):
        assert result.plot(tmp_path / f"s{log}.png", log=log).read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs, match", [
    (dict(spans=[(3, 8), (8, 50)]), r"step 1's span \(8, 50\) does not fit the trace's 41 positions.*0 <= start <= end <= 41"),
    (dict(spans=[(3, 8), (6, 12)]), r"steps 0 and 1 overlap or are out of order.*sort the spans, or merge"),
    (dict(spans=[(8, 12), (3, 8)]), r"steps 0 and 1 overlap or are out of order"),
    (dict(spans=[(5, 3)]), r"does not fit"),
    (dict(spans=[]), r"no steps"),
    (dict(spans=[(3, 8)], layers=[2]), r"layer 2 does not exist: this model has 2 layers; pass layers= as indices 0..1"),
    (dict(spans=[(3, 8)], layers=[]), r"layers= is empty"),
    (dict(), r"tokens= needs spans="),
])
def test_bad_input_is_refused_with_the_problem_and_the_fix(tiny, kwargs, match):
    model = tiny("qwen2")
    kwargs = {"tokens": trace(model.cfg.d_vocab), **kwargs}
    with pytest.raises(ValueError, match=match):
        step_attention(model, **kwargs)
    with pytest.raises(ValueError, match=match):
        suppress_steps(model, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=[4]), r"head 4 does not exist: this model has 4 heads per layer \(0..3\)"),
    (dict(heads=[(0, 1)], layers=[0]), r"names the layers already; drop layers="),
    (dict(heads=[(5, 1)]), r"layer 5 does not exist"),
    (dict(steps=[9]), r"step 9 does not exist: the trace has 7 steps"),
    (dict(layers=["a"]), r"layer 'a' does not exist"),
])
def test_bad_suppression_choices_are_refused_with_the_problem_and_the_fix(tiny, kwargs, match):
    model = tiny("qwen2")
    with pytest.raises(ValueError, match=match):
        suppress_steps(model, tokens=trace(model.cfg.d_vocab), spans=SPANS, **kwargs)


def test_a_batch_of_traces_or_both_a_cot_and_tokens_is_refused(tiny):
    model = tiny("qwen2")
    tokens = trace(model.cfg.d_vocab)
    with pytest.raises(ValueError, match=r"one trace, \[pos\] or \[1, pos\]"):
        step_attention(model, tokens=torch.stack([tokens, tokens]), spans=SPANS)
    cot = SimpleNamespace(tokens=tokens.tolist(), steps=[], embeds=None)
    with pytest.raises(ValueError, match="not both"):
        step_attention(model, cot, tokens=tokens)
    with pytest.raises(ValueError, match="nothing to analyse"):
        suppress_steps(model)
