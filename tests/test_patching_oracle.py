"""The patching engine against an oracle that shares no code with it (plain run_with_hooks and a
hand-written hook); several metrics from one sweep; iterative patching step by step; embeddings in."""

from __future__ import annotations

import pytest
import torch

from hookedcot import get_act_name
from hookedcot.interp.iterative import patch_in_parallel, patch_iteratively
from hookedcot.interp.patching import Site, kl_metric, prepare_runs, run_sites
from hookedcot.interp.sweeps import (
    patch_components, patch_heads, patch_layer_position, patch_layers, patch_naively,
)
from hookedcot.interp.tracing import trace_restoration
from patching_pair import CFG, answer_logprob as _answer_logprob, model, pair  # noqa: F401  (fixtures)


ORACLE_TOL = dict(rtol=1e-5, atol=1e-5)


def _oracle(model, clean, corrupted, name, metric, positions, heads=None, neurons=None):
    """metric of the corrupted run with the clean activation written by a hand-written hook."""
    _, cache = model.run_with_cache(clean, names_filter=name)
    clean_act = cache[name]
    pos = list(positions)

    def hook(x, hook):
        x = x.clone()
        if name.endswith("hook_pattern") or name.endswith("hook_attn_scores"):  # b h q s
            for h in range(x.shape[1]) if heads is None else heads:
                x[:, h, pos] = clean_act[:, h, pos]
        elif heads is not None:  # b p h k
            for h in heads:
                x[:, pos, h] = clean_act[:, pos, h]
        elif neurons is not None:  # b p m
            for p in pos:
                for n in neurons:
                    x[:, p, n] = clean_act[:, p, n]
        else:
            x[:, pos] = clean_act[:, pos]
        return x

    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))[0])


def test_layer_position_sites_equal_a_hand_written_oracle(model, pair):
    clean, corrupted = pair
    metric = _answer_logprob(model, clean)
    names = [get_act_name(h, L) for h in ("resid_pre", "attn_out", "mlp_out", "resid_post") for L in range(CFG.n_layers)]
    runs = prepare_runs(model, clean, corrupted, names)
    sites = [Site(n, (p,)) for n in names for p in (0, 4, 6, 9, 13)]
    fast = run_sites(runs, sites, metric, progress=False)
    oracle = [_oracle(model, clean, corrupted, s.hook, metric, s.positions) for s in sites]
    torch.testing.assert_close(fast, torch.tensor(oracle), **ORACLE_TOL)
    assert fast.std() > 1e-3  # the sites do something


def test_span_head_neuron_and_pattern_sites_equal_a_hand_written_oracle(model, pair):
    clean, corrupted = pair
    metric = _answer_logprob(model, clean)
    span = (4, 5, 6, 7, 8, 9)
    sites = [Site(get_act_name("resid_pre", L), span) for L in range(CFG.n_layers)]  # layers over a span
    sites += [Site(get_act_name(hook, L), pos, heads=(h,)) for hook, n_heads in (("z", 4), ("v", 2), ("q", 4))
              for L in (0, 2) for h in range(n_heads) for pos in (None, (9, 10))]
    sites += [Site(get_act_name("pattern", L), pos, heads=heads) for L in (1, 3)
              for pos, heads in ((None, (2,)), ((9, 12), (0, 3)), ((11,), None))]
    sites += [Site(get_act_name("post", L), (4, 9), neurons=(n,)) for L in (0, 3) for n in (0, 5, 17)]
    runs = prepare_runs(model, clean, corrupted, sorted({s.hook for s in sites}))
    fast = run_sites(runs, sites, metric, progress=False)
    oracle = [_oracle(model, clean, corrupted, s.hook, metric, range(14) if s.positions is None else s.positions,
                      heads=s.heads, neurons=s.neurons) for s in sites]
    torch.testing.assert_close(fast, torch.tensor(oracle), **ORACLE_TOL)
    assert fast.std() > 1e-3


def test_the_naive_loop_equals_the_hand_written_oracle(model, pair):
    clean, corrupted = pair
    metric = _answer_logprob(model, clean)
    sites = [Site(get_act_name("z", 1), (9,), heads=(2,)), Site(get_act_name("pattern", 2), (12,), heads=(1,)),
             Site(get_act_name("post", 1), (4,), neurons=(3, 7)), Site(get_act_name("resid_mid", 2), (4, 9))]
    naive = patch_naively(model, clean, corrupted, sites, metric)
    oracle = [_oracle(model, clean, corrupted, s.hook, metric, s.positions, heads=s.heads, neurons=s.neurons) for s in sites]
    assert naive.tolist() == torch.tensor(oracle).tolist()  # the same full forwards: bit-identical


# ---------------------------------------------------------------- several metrics, one sweep
def _count_forwards(model):
    """A hook counting forwards (every forward the engine runs passes the last block)."""
    count = [0]

    def hook(x, h):
        count[0] += 1

    return count, (get_act_name("resid_post", CFG.n_layers - 1), hook)


SWEEPS = {
    "patch_layer_position": lambda m, c, k, metric: patch_layer_position(m, c, k, metric=metric, progress=False),
    "patch_layers": lambda m, c, k, metric: patch_layers(m, c, k, metric=metric, positions="from 4", progress=False),
    "patch_heads": lambda m, c, k, metric: patch_heads(m, c, k, metric=metric, positions=[9, 10], progress=False),
    "patch_components": lambda m, c, k, metric: patch_components(m, c, k, metric=metric, per_position=True,
                                                                 positions="last 5", progress=False),
    "trace_restoration": lambda m, c, k, metric: trace_restoration(m, c, [1, 2], metric=metric, positions="last 4",
                                                                   progress=False),
}


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_several_metrics_equal_separate_sweeps_at_the_cost_of_one(model, pair, sweep):
    clean, corrupted = pair
    base = model(corrupted)[:, -1:].detach()
    target = int(model(clean)[0, -1].argmax())
    metrics = {
        "logprob": lambda lg: lg[:, -1].float().log_softmax(-1)[:, target],
        "kl": lambda lg: (lg.float().log_softmax(-1).exp() * (lg.float().log_softmax(-1) - base.float().log_softmax(-1))).sum((-1, -2)),
        "top1": lambda lg: (lg[:, -1].argmax(-1) == target).float(),
    }
    run = SWEEPS[sweep]
    count, counter = _count_forwards(model)
    with model.hooks([counter]):
        together = run(model, clean, corrupted, metrics)
    n_together, count[0] = count[0], 0
    separate = {}
    for name, fn in metrics.items():
        with model.hooks([counter]):
            separate[name] = run(model, clean, corrupted, fn)
        if name == "logprob":
            n_one = count[0]
    assert set(together) == set(metrics)
    for name, result in together.items():
        assert torch.equal(result.values, separate[name].values), name  # the same forwards: bit-identical
        assert result.axes == separate[name].axes and result.labels == separate[name].labels
        assert result.meta["metric"] == name and result.name.endswith(name)
    assert n_together == n_one and count[0] == len(metrics) * n_one
    assert n_one > 2  # the sweep ran patched forwards, not only the clean and corrupted runs


def test_run_sites_and_the_naive_loop_take_a_dict_of_metrics(model, pair):
    clean, corrupted = pair
    runs = prepare_runs(model, clean, corrupted, [get_act_name("resid_pre", 1)])
    sites = [Site(get_act_name("resid_pre", 1), (p,)) for p in (2, 4, 9)]  # 2 lies in the shared prefix
    metrics = {"kl": kl_metric(runs), "logit0": lambda lg: lg[:, -1, 0].float()}
    values = run_sites(runs, sites, metrics, progress=False)
    for name, fn in metrics.items():
        assert torch.equal(values[name], run_sites(runs, sites, fn, progress=False))
    naive = patch_naively(model, clean, corrupted, sites, metrics)
    for name in metrics:
        torch.testing.assert_close(values[name], naive[name], **ORACLE_TOL)


# ---------------------------------------------------------------- iterative patching
def _iterate_by_hand(model, clean, corrupted, name, span, metric, regenerate=None, embeds=None):
    """Iterative patching as written before the engine: one full forward per step with a hand-written hook."""
    _, cache = model.run_with_cache(clean, names_filter=name)
    ref = cache[name]
    tokens = None if embeds is not None else corrupted.clone()
    embeds = None if embeds is None else embeds.clone()
    last_resid = get_act_name("resid_post", CFG.n_layers - 1)
    cosines = []

    def run(patched):
        def hook(x, hook):
            x = x.clone()
            x[:, patched] = ref[:, patched]
            return x

        inputs = {"inputs_embeds": embeds} if embeds is not None else {"input": tokens}
        return model.run_with_cache(**inputs, fwd_hooks=[(name, hook)], names_filter=[name, last_resid])

    for i, pos in enumerate(span):
        logits, run_cache = run(span[: i + 1])
        if i + 1 == len(span):
            break
        nxt = span[i + 1]
        if regenerate == "greedy":
            tokens[0, nxt] = logits[0, nxt - 1].argmax()
        elif callable(regenerate):
            embeds[0, nxt] = regenerate(run_cache[last_resid][0, nxt - 1])
        if regenerate is not None:
            _, run_cache = run(span[: i + 1])
        cosines.append(float(torch.nn.functional.cosine_similarity(run_cache[name][0, nxt], ref[0, nxt], dim=0)))
    return float(metric(logits[:, -1:])[0]), cosines, logits[:, -1:]


@pytest.mark.parametrize("regenerate", [None, "greedy", "feedback"])
@pytest.mark.parametrize("layer", [0, 2])
def test_iterative_patching_equals_the_plain_step_by_step_loop(model, pair, regenerate, layer):
    clean, corrupted = pair
    metric = _answer_logprob(model, clean)
    span = [9, 10, 11, 12]
    name = get_act_name("resid_post", layer)
    embeds = None
    if regenerate == "feedback":
        embeds = model.W_E[corrupted].detach().clone()
        regenerate = lambda h: h * 0.5  # noqa: E731  (a latent-CoT model feeds hidden states back)
    with torch.no_grad():
        value, cosines, logits = _iterate_by_hand(model, clean, corrupted, name, span, metric, regenerate, embeds)
    res = patch_iteratively(model, clean, None if embeds is not None else corrupted, layer, span, metric,
                            regenerate=regenerate, corrupted_embeds=embeds)
    torch.testing.assert_close(res.final_logits, logits, **ORACLE_TOL)
    assert res.metric == pytest.approx(value, rel=1e-5, abs=1e-5)
    assert res.produced_cosine == pytest.approx(cosines, rel=1e-5, abs=1e-5)


def test_iterative_patching_recomputes_only_from_each_patched_position(model, pair):
    clean, corrupted = pair
    metric = _answer_logprob(model, clean)
    span, name, n = [9, 10, 11, 12], get_act_name("resid_post", 1), 14
    for regenerate, first_block in ((None, 1), ("greedy", 0)):
        seen = []
        with model.hooks([(get_act_name("resid_pre", first_block), lambda x, h: seen.append(x.shape[1]))]):
            patch_iteratively(model, clean, corrupted, 1, span, metric, regenerate=regenerate)
        # the clean and corrupted runs, then each step from its position on (the last step of fixed
        # inputs from the span's start, as the parallel patch does)
        last_start = span[0] if regenerate is None else span[-1]
        assert seen == [n, n] + [n - p for p in span[:-1]] + [n - last_start], (regenerate, seen)
    assert patch_in_parallel(model, clean, corrupted, 1, span, metric) == patch_iteratively(
        model, clean, corrupted, 1, span, metric).metric  # fixed inputs: bit-identical


def test_prepare_runs_takes_the_corrupted_run_as_embeddings(model, pair):
    clean, corrupted = pair
    names = [get_act_name("resid_pre", L) for L in range(CFG.n_layers)]
    by_tokens = prepare_runs(model, clean, corrupted, names)
    by_embeds = prepare_runs(model, clean, None, names, corrupted_embeds=model.W_E[corrupted].detach())
    assert torch.equal(by_tokens.corrupted_final, by_embeds.corrupted_final)
    assert by_embeds.shared_prefix == 0 and by_embeds.label_tokens is by_embeds.clean_tokens
    sites = [Site(n, (p,)) for n in names for p in (4, 9, 12)]
    metric = _answer_logprob(model, clean)
    torch.testing.assert_close(run_sites(by_embeds, sites, metric, progress=False),
                               run_sites(by_tokens, sites, metric, progress=False), rtol=0, atol=0)
    with pytest.raises(ValueError, match="corrupted_embeds"):
        prepare_runs(model, clean, None, names)
    with pytest.raises(ValueError, match="equal lengths"):
        prepare_runs(model, clean, None, names, corrupted_embeds=model.W_E[corrupted[:, :-1]].detach())


