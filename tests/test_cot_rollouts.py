"""Rollouts and resampling importance: the sampling rule, shared-prefix decoding against a naive
recomputing loop, batch independence, greedy = generate, the resumable file, the KL and the
counterfactual filter. The oracles re-derive seeds and picks from the documented rule by hand."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from hookedcot import HookedCoT
from hookedcot.cot import CoT
from hookedcot.cot.importance import answer_counts, answer_kl, keep_different, measure_importance, resample_steps
from hookedcot.cot.rollout_store import FILE_NAME, read_rollouts
from hookedcot.cot.rollouts import Rollout, Sampling, prefix_key, rollout_seed, sample_rollouts, sample_tokens
from hookedcot.cot.similarity import ResidualSimilarity

PREFIX = [5, 17, 42, 99, 7, 63, 150, 11, 200, 31]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return HookedCoT.from_pretrained(tiny_checkpoints["r1_distill_qwen"])  # untied: far from degenerate


@pytest.fixture(scope="module")
def arithmetic(smol_model):
    return CoT.from_text(smol_model, "Q: What is 12 times 7?\nA: <think>",
                         "I multiply 12 by 7. Ten times 7 is 70. Two times 7 is 14.</think> The answer is 84.",
                         correct_answer="84")


def seed_by_hand(seed, prefix, index):
    key = hashlib.sha256(",".join(map(str, prefix)).encode()).hexdigest()[:16]
    return int.from_bytes(hashlib.sha256(f"hookedcot.rollout/{seed}/{key}/{index}".encode()).digest()[:8], "little")


def pick_by_hand(logits, u, temperature, top_p, top_k):
    """The documented rule written out with a full sort: descending order, top-k, top-p over the
    renormalised top-k, first token whose cumulative kept mass exceeds u × the kept total."""
    probs = (logits.double() / temperature).softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    order = order[:top_k] if top_k else order
    kept, mass, total = [], 0.0, sum(probs[i] for i in order)
    for i in order:
        if top_p is not None and mass >= top_p:
            break
        kept.append(i)
        mass += probs[i] / total
    target, acc = u * sum(probs[i] for i in kept), 0.0
    for i in kept:
        acc += probs[i]
        if acc > target:
            return i
    return kept[-1]


def test_the_seed_rule_is_the_documented_one():
    assert prefix_key(PREFIX) == hashlib.sha256(b"5,17,42,99,7,63,150,11,200,31").hexdigest()[:16]
    assert rollout_seed(3, prefix_key(PREFIX), 7) == seed_by_hand(3, PREFIX, 7)
    assert rollout_seed(3, "a", 7) != rollout_seed(3, "a", 8) != rollout_seed(4, "a", 8)


@pytest.mark.parametrize("top_p,top_k", [(0.9, None), (0.5, 20), (None, 50), (0.999, None)])
def test_sample_tokens_follows_the_rule_also_when_64_candidates_fall_short(top_p, top_k):
    gen = torch.Generator().manual_seed(0)
    peaked = torch.randn(6, 500, generator=gen) * 4
    flat = torch.randn(6, 500, generator=gen) * 0.05  # top-p needs far more than 64 tokens here
    logits = torch.cat([peaked, flat])
    u = torch.rand(12, generator=gen, dtype=torch.float64)
    picks = sample_tokens(logits, u, Sampling(0.7, top_p, top_k))
    assert picks.tolist() == [pick_by_hand(row, float(x), 0.7, top_p, top_k) for row, x in zip(logits, u)]


def test_shared_prefix_rollouts_equal_a_loop_that_recomputes_the_prefix(tiny):
    n_new, temperature, top_p = 10, 0.7, 0.9
    rollouts = sample_rollouts(tiny, PREFIX, 5, temperature=temperature, top_p=top_p, max_new_tokens=n_new,
                               seed=11, stop_at_eos=False, progress=False)
    for r in rollouts:
        gen = torch.Generator().manual_seed(seed_by_hand(11, PREFIX, r.index))
        u = torch.rand(n_new, generator=gen, dtype=torch.float64)
        tokens = list(PREFIX)
        for t in range(n_new):
            with torch.no_grad():
                logits = tiny(torch.tensor([tokens]))[0, -1]
            tokens.append(pick_by_hand(logits, float(u[t]), temperature, top_p, None))
        assert r.seed == seed_by_hand(11, PREFIX, r.index)
        assert r.tokens == tokens[len(PREFIX):], f"rollout {r.index}"
        assert r.finish == "length"


def test_a_batched_rollout_equals_the_same_rollout_run_alone_also_when_rows_finish_early(tiny):
    free = sample_rollouts(tiny, PREFIX, 8, max_new_tokens=12, temperature=1.0, stop_at_eos=False, progress=False)
    rows_with = torch.bincount(torch.tensor([t for r in free for t in set(r.tokens)]))
    eos = int((rows_with - 4).abs().argmin())  # in about half the rows: as eos, rows stop at different steps
    kwargs = dict(max_new_tokens=12, temperature=1.0, eos_token_id=eos, progress=False)
    batched = sample_rollouts(tiny, PREFIX, 8, **kwargs)
    assert len({len(r.tokens) for r in batched}) > 2 and {r.finish for r in batched} == {"eos", "length"}
    one_row = sample_rollouts(tiny, PREFIX, 8, memory_budget=1, **kwargs)  # a batch of one row each
    assert [r.tokens for r in one_row] == [r.tokens for r in batched]
    alone = sample_rollouts(tiny, PREFIX, 0, indices=[6], **kwargs)
    assert alone[0].tokens == batched[6].tokens and alone[0].index == 6


def test_a_hook_reading_the_pattern_sees_every_row_attend_to_the_whole_prefix_and_changes_nothing(tiny):
    kwargs = dict(max_new_tokens=6, temperature=1.0, seed=3, stop_at_eos=False, progress=False)
    plain = sample_rollouts(tiny, PREFIX, 4, **kwargs)
    shapes = []

    def record(pattern, hook):  # b h q s: the prefix copied to each row for the hooks
        shapes.append(tuple(pattern.shape))
        assert torch.allclose(pattern.sum(-1), torch.ones(()))
        if pattern.shape[2] == 1:  # a decode step: the whole prefix is visible
            assert (pattern[..., : len(PREFIX)] > 0).all()

    hooked = sample_rollouts(tiny, PREFIX, 4, fwd_hooks=[("blocks.0.attn.hook_pattern", record)], **kwargs)
    assert [r.tokens for r in hooked] == [r.tokens for r in plain]
    h = tiny.cfg.n_heads
    assert shapes == [(1, h, len(PREFIX), len(PREFIX))] + [(4, h, 1, len(PREFIX) + t) for t in range(1, 6)]


def test_seeded_rollouts_are_reproducible_and_a_longer_budget_extends_them(tiny):
    a = sample_rollouts(tiny, PREFIX, 4, max_new_tokens=6, seed=5, stop_at_eos=False, progress=False)
    b = sample_rollouts(tiny, PREFIX, 4, max_new_tokens=6, seed=5, stop_at_eos=False, progress=False)
    longer = sample_rollouts(tiny, PREFIX, 4, max_new_tokens=9, seed=5, stop_at_eos=False, progress=False)
    other = sample_rollouts(tiny, PREFIX, 4, max_new_tokens=6, seed=6, stop_at_eos=False, progress=False)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in longer] and all(lr.tokens[:6] == r.tokens for lr, r in zip(longer, a))
    assert [r.tokens for r in other] != [r.tokens for r in a]


def test_temperature_0_makes_every_rollout_the_greedy_continuation(smol_model):
    prompt = smol_model.to_tokens("The capital of France is")[0]
    greedy = smol_model.generate(prompt[None], 12, return_type="tokens")[0, len(prompt):].tolist()
    rollouts = sample_rollouts(smol_model, prompt, 3, temperature=0, max_new_tokens=12, progress=False)
    assert [r.tokens for r in rollouts] == [greedy] * 3
    stopped = smol_model.generate(prompt[None], 12, stop_strings=["."], return_type="tokens")[0, len(prompt):].tolist()
    at_stop = sample_rollouts(smol_model, prompt, 1, temperature=0, max_new_tokens=12, stop_strings=["."],
                              progress=False)
    assert at_stop[0].tokens == stopped and at_stop[0].finish == "stop" and "." in at_stop[0].text


def test_rollouts_are_handed_back_as_they_finish(tiny):
    seen = []
    out = sample_rollouts(tiny, PREFIX, 3, max_new_tokens=4, stop_at_eos=False, on_rollout=seen.append, progress=False)
    assert sorted(r.index for r in seen) == [0, 1, 2] and [r.index for r in out] == [0, 1, 2]


def test_kl_is_zero_for_identical_distributions_and_matches_a_hand_computation():
    assert answer_kl({"4": 3, "5": 1}, {"5": 2, "4": 6}) == pytest.approx(0.0, abs=1e-15)
    # ε = 0.01 over the outcomes {a, b, c}: p = (.75, .25, 0) -> (.76, .26, .01) / 1.03, q = (.26, .26, .51) / 1.03
    expected = (0.76 * math.log(0.76 / 0.26) + 0.26 * math.log(1) + 0.01 * math.log(0.01 / 0.51)) / 1.03
    assert answer_kl({"a": 3, "b": 1}, {"a": 1, "b": 1, "c": 2}) == pytest.approx(expected, rel=1e-12)
    # at 100 rollouts a side, ε = 0.01 is Laplace's add-one on the counts
    p, q = {"a": 70, "b": 30}, {"a": 40, "b": 55, "c": 5}
    laplace = sum((p.get(x, 0) + 1) / 103 * math.log((p.get(x, 0) + 1) / (q.get(x, 0) + 1)) for x in "abc")
    assert answer_kl(p, q) == pytest.approx(laplace, rel=1e-12)
    assert answer_kl({"a": 1}, {"b": 1}, smoothing=0) == math.inf
    assert math.isnan(answer_kl({}, {"a": 1}))
    assert answer_counts(["1,000", "1000.0", None, "$1000", "7"]) == {"1000": 3, "<no answer>": 1, "7": 1}


def test_counterfactual_filter_keeps_exactly_the_dissimilar_rollouts(arithmetic):
    cot = arithmetic
    n = cot.n_steps + 1
    # cut off ("length") but each closes its think block and answers after it; "" says nothing
    texts = ["Same idea again.</think> Then 84.", "A new plan.</think> So 70.", "", "Same thing.</think> Answer 84.",
             "Other route.</think> 14."]
    answers = ["84", "70", None, "84", "14"]
    rollouts = [[Rollout(i, 0, [], t, a, "length", prefix=k) for i, (t, a) in enumerate(zip(texts, answers))]
                for k in range(n)]
    seen = []

    def stub(a: str, b: str) -> float:
        seen.append(a)
        return 0.95 if a.startswith("Same") else 0.1

    res = measure_importance(cot, rollouts, stub, threshold=0.8)
    assert res.n_kept == [3] * cot.n_steps  # "A new plan.", "" (no new step) and "Other route."
    assert "" not in seen
    kept = {"70": 1, "<no answer>": 1, "14": 1}
    every = {"84": 2, "70": 1, "<no answer>": 1, "14": 1}
    assert res.counterfactual == [pytest.approx(answer_kl(kept, every))] * cot.n_steps
    assert res.importance == [0.0] * cot.n_steps
    assert res.acc_counterfactual == [0.0] * cot.n_steps and res.accuracy == [0.4] * n
    assert keep_different(["Same a.", "B b."], "step", stub, threshold=0.96) == [True, True]


def test_resampling_writes_every_rollout_and_resumes_without_resampling(smol_model, arithmetic, tmp_path, monkeypatch):
    kwargs = dict(max_new_tokens=6, seed=3, progress=False, similarity=lambda a, b: 0.0)
    full = resample_steps(smol_model, arithmetic, 3, out_dir=tmp_path / "full", **kwargs)
    n_total = 3 * (arithmetic.n_steps + 1)
    header, on_disk = read_rollouts(tmp_path / "full" / FILE_NAME)
    assert full.n_sampled == n_total and len(on_disk) == n_total and header["sampling"]["max_new_tokens"] == 6
    assert len({(r.prefix, r.index) for r in on_disk}) == n_total

    part = tmp_path / "part"
    part.mkdir()
    lines = (tmp_path / "full" / FILE_NAME).read_text().splitlines(keepends=True)
    (part / FILE_NAME).write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])  # 5 rollouts + a torn line
    asked = []
    import hookedcot.cot.importance as importance

    real = importance.run_prefix
    monkeypatch.setattr(importance, "run_prefix",
                        lambda m, p, jobs, *a, **k: asked.extend(jobs) or real(m, p, jobs, *a, **k))
    resumed = resample_steps(smol_model, arithmetic, 3, out_dir=part, **kwargs)
    assert resumed.n_sampled == n_total - 5 == len(asked)
    same = {"rollouts_path": None, "n_sampled": 0}
    assert resumed.to_dict() | same == full.to_dict() | same
    assert [[r.tokens for r in rs] for rs in resumed.rollouts] == [[r.tokens for r in rs] for rs in full.rollouts]
    after = (part / FILE_NAME).read_text().splitlines(keepends=True)
    assert after[:6] == lines[:6] and len(after) == n_total + 1
    assert all(json.loads(line) for line in after)

    again = resample_steps(smol_model, arithmetic, 3, out_dir=part, **kwargs)
    assert again.n_sampled == 0
    with pytest.raises(ValueError, match=r"sampling.temperature: file has 0.6, this call 0.7.*new out_dir"):
        resample_steps(smol_model, arithmetic, 3, out_dir=part, **(kwargs | {"temperature": 0.7}))
    other = CoT.from_text(smol_model, "Q: What is 2 plus 2?\nA: <think>", "Two and two. That makes four.</think> 4")
    with pytest.raises(ValueError, match="trace: file has"):
        resample_steps(smol_model, other, 3, out_dir=part, **kwargs)


def test_residual_similarity_batches_equal_texts_run_alone(smol_model):
    texts = ["So 12 times 7 equals 84.", "Wait, I made a mistake and should go back.", "Multiplying 12 by 7 gives 84."]
    batched = ResidualSimilarity(smol_model, reference="Let me think about this problem step by step.")
    batched.prepare(texts)
    for text in texts:
        alone = ResidualSimilarity(smol_model, reference="Let me think about this problem step by step.")
        alone.prepare([text])
        torch.testing.assert_close(batched._vectors[text], alone._vectors[text], atol=1e-3, rtol=1e-4)
    assert batched(texts[0], texts[0]) == pytest.approx(1.0)
    assert batched(texts[0], texts[2]) > batched(texts[0], texts[1])
