"""The patching engine and the sweeps on it: identities that must hold, and agreement with the
slow obvious loop (one hooked forward per site)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from model_factory import random_model

from hookedcot import HookedCoT, ModelConfig, get_act_name
from hookedcot.interp.attribution import patch_by_attribution
from hookedcot.interp.iterative import patch_in_parallel, patch_iteratively
from hookedcot.interp.patching import Site, forward_patched, kl_metric, prepare_runs, run_sites
from hookedcot.interp.sweeps import (
    patch_components, patch_heads, patch_layer_position, patch_layers, patch_naively,
)
from hookedcot.interp.tracing import trace_restoration

CFG = ModelConfig(n_layers=4, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128, d_vocab=300, qkv_bias=True)


def _model(noise: float) -> HookedCoT:
    return random_model(CFG, noise)


@pytest.fixture(scope="module")
def model() -> HookedCoT:
    return _model(0.3)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, CFG.d_vocab, (1, 14), generator=torch.Generator().manual_seed(3))
    corrupted = clean.clone()
    corrupted[0, 4], corrupted[0, 9] = 7, 8
    return clean, corrupted


def test_patching_a_run_into_itself_changes_nothing(model, pair):
    clean, _ = pair
    exact = patch_layer_position(model, clean, clean, progress=False, batch_size=1000)
    assert torch.all(exact.values.abs() <= 1e-6)
    runs = prepare_runs(model, clean, clean, [get_act_name("resid_pre", 0)])
    values = run_sites(runs, [Site(get_act_name("resid_pre", 0))], kl_metric(runs), progress=False, reuse_prefix=False,
                       skip_inert=False)
    assert values.item() == 0.0


def test_sites_in_the_shared_prefix_are_not_run_and_equal_running_them(model, pair, monkeypatch):
    from hookedcot.interp import patching

    clean, corrupted = pair  # they first differ at position 4
    runs = prepare_runs(model, clean, corrupted, [get_act_name("resid_pre", L) for L in range(CFG.n_layers)])
    assert runs.shared_prefix == 4
    sites = [Site(get_act_name("resid_pre", L), (p,)) for L in range(CFG.n_layers) for p in range(14)]
    rows_run = []
    real_run_batch = patching._run_batch
    monkeypatch.setattr(patching, "_run_batch", lambda r, s, *a: rows_run.append(len(s)) or real_run_batch(r, s, *a))
    metric = kl_metric(runs)
    straddling = Site(get_act_name("resid_pre", 1), (3, 4))  # reaches past the prefix: must run
    skipped = run_sites(runs, sites + [straddling], metric, progress=False)
    assert sum(rows_run) == CFG.n_layers * (14 - 4) + 1
    inert = [i for i, s in enumerate(sites) if s.positions[0] < 4]
    assert torch.equal(skipped[inert], metric(runs.logits("corrupted", [-1])).float().expand(len(inert)))
    run_all = run_sites(runs, sites + [straddling], metric, progress=False, skip_inert=False)
    torch.testing.assert_close(skipped, run_all, rtol=0, atol=1e-6)
    # hooks shaping a run (noise, steering; given to prepare_runs, persistent or scoped) void the shortcut
    name = get_act_name("resid_pre", 0)
    assert prepare_runs(model, clean, corrupted, [name], target_hooks=[(name, lambda x, h: x)]).shared_prefix == 0
    with model.hooks([(name, lambda x, h: x)]):
        assert prepare_runs(model, clean, corrupted, [name]).shared_prefix == 0
    model.add_hook(name, lambda x, h: x)
    try:
        assert prepare_runs(model, clean, corrupted, [name]).shared_prefix == 0
    finally:
        model.reset_hooks()


def test_patching_all_of_layer0_resid_pre_gives_the_clean_run(model, pair):
    clean, corrupted = pair
    runs = prepare_runs(model, clean, corrupted, [get_act_name("resid_pre", 0)])
    clean_logits = runs.logits("clean", range(14))
    values = run_sites(runs, [Site(get_act_name("resid_pre", 0))], lambda lg: (lg - clean_logits).abs().amax((1, 2)),
                       metric_positions=range(14), progress=False)
    assert values.item() == 0.0
    torch.testing.assert_close(clean_logits, model(clean), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 7, "auto"])
def test_layer_position_sweep_equals_naive_loop(model, pair, batch_size):
    clean, corrupted = pair
    result = patch_layer_position(model, clean, corrupted, progress=False, batch_size=batch_size)
    assert result.values.shape == (CFG.n_layers, 14)
    runs = prepare_runs(model, clean, corrupted, [get_act_name("resid_pre", 0)])
    sites = [Site(get_act_name("resid_pre", L), (p,)) for L in range(CFG.n_layers) for p in range(14)]
    sampled = sites[::3]
    naive = patch_naively(model, clean, corrupted, sampled, kl_metric(runs))
    torch.testing.assert_close(result.values.flatten()[::3], naive, rtol=1e-5, atol=1e-5)
    # Only the patched token positions (4 and 9) can matter for resid_pre at layer 0.
    assert torch.all(result.values[0, [i for i in range(14) if i not in (4, 9)]].abs() < 1e-5)
    assert result.values[0, 4] > 1e-3


def test_launch_bound_batching_merges_positions_and_keeps_values(model, pair, monkeypatch):
    """On a GPU (`free_tokens` > 0) rows starting at different positions share a batch: far fewer
    forwards, the same values as the CPU's tight batches."""
    from hookedcot.interp import patching

    clean, corrupted = pair
    batches: list[int] = []
    real_run_batch = patching._run_batch
    monkeypatch.setattr(patching, "_run_batch", lambda r, s, *a: batches.append(len(s)) or real_run_batch(r, s, *a))
    tight = patch_layer_position(model, clean, corrupted, progress=False).values
    n_tight, batches[:] = len(batches), []
    monkeypatch.setattr(patching, "free_tokens", lambda *a: 10**6)
    merged = patch_layer_position(model, clean, corrupted, progress=False).values
    assert len(batches) < n_tight and max(batches) > 14  # whole layers and more per batch
    torch.testing.assert_close(merged, tight, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    assert patching.free_tokens(model, 14) == 0  # the real rule: nothing is free on a CPU
    smollm2 = ModelConfig(n_layers=30, d_model=576, n_heads=9, n_key_value_heads=3, d_head=64, d_mlp=1536, d_vocab=49152)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    gpu = lambda dtype: SimpleNamespace(device=torch.device("cuda"), cfg=smollm2, dtype=dtype)  # noqa: E731
    on_h200 = patching.free_tokens(gpu(torch.bfloat16), 64)
    assert 64 * 64 < on_h200 < 10**5  # a whole 64-position layer of SmolLM2 per batch
    assert patching.free_tokens(gpu(torch.float32), 64) == pytest.approx(on_h200 / 16, rel=0.01)
    assert patching.free_tokens(gpu(torch.bfloat16), 4096) < on_h200 / 2  # long prompts: attention counts
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=33))
    assert patching.free_tokens(gpu(torch.bfloat16), 64) == pytest.approx(on_h200 / 4, rel=0.01)


@pytest.mark.parametrize("hook", ["z", "v", "pattern"])
def test_head_sweep_equals_naive_loop(model, pair, hook):
    clean, corrupted = pair
    result = patch_heads(model, clean, corrupted, hook=hook, progress=False)
    n_heads = result.values.shape[1]
    assert n_heads == (CFG.n_key_value_heads if hook == "v" else CFG.n_heads)
    runs = prepare_runs(model, clean, corrupted, [get_act_name(hook, 0)])
    sites = [Site(get_act_name(hook, L), None, heads=(h,)) for L in range(CFG.n_layers) for h in range(n_heads)]
    naive = patch_naively(model, clean, corrupted, sites, kl_metric(runs)).view(CFG.n_layers, n_heads)
    torch.testing.assert_close(result.values, naive, rtol=1e-5, atol=1e-5)


def test_component_and_layer_sweeps(model, pair, tmp_path):
    clean, corrupted = pair
    comps = patch_components(model, clean, corrupted, progress=False)
    assert comps.axes == ("component", "layer") and comps.values.shape == (5, CFG.n_layers)
    span = patch_layers(model, clean, corrupted, positions="last 6", progress=False)
    runs = prepare_runs(model, clean, corrupted, [get_act_name("resid_pre", 0)])
    sites = [Site(get_act_name("resid_pre", L), tuple(range(8, 14))) for L in range(CFG.n_layers)]
    torch.testing.assert_close(span.values, patch_naively(model, clean, corrupted, sites, kl_metric(runs)), rtol=1e-5, atol=1e-5)
    # Results save, load and plot.
    path = comps.save(tmp_path)
    assert type(comps).load(path).values.equal(comps.values)
    assert comps.plot(tmp_path / "c.png").stat().st_size > 1000
    assert len(comps.to_pandas()) == 5 * CFG.n_layers


def test_neuron_site_equals_naive(model, pair):
    clean, corrupted = pair
    runs = prepare_runs(model, clean, corrupted, [get_act_name("post", 1)])
    sites = [Site(get_act_name("post", 1), (4, 9), neurons=(n,)) for n in (0, 5, 17)]
    fast = run_sites(runs, sites, kl_metric(runs), progress=False)
    torch.testing.assert_close(fast, patch_naively(model, clean, corrupted, sites, kl_metric(runs)), rtol=1e-5, atol=1e-5)


def test_restoration_sweep_identities(model, pair):
    clean, _ = pair
    no_noise = trace_restoration(model, clean, [0, 1, 2], sigma=0.0, progress=False,
                                 metric=lambda lg: lg[:, -1].float().softmax(-1).amax(-1))
    top = model(clean)[0, -1].detach().float().softmax(-1).max()
    torch.testing.assert_close(no_noise.values, torch.full_like(no_noise.values, float(top)), rtol=1e-5, atol=1e-6)
    noisy = trace_restoration(model, clean, [0, 1, 2], sigma=3.0, progress=False)
    # Restoring every noised position at layer 0 is not one site, but restoring a clean position
    # that carries no noise at layer 0 changes nothing: recovery 0.
    assert torch.all(noisy.values[0, 3:].abs() < 1e-4)


def test_parallel_and_iterative_agree_where_positions_cannot_interact(model, pair):
    clean, corrupted = pair
    target = int(model(clean)[0, -1].argmax())
    metric = lambda lg: lg[:, -1].float().log_softmax(-1)[:, target]  # noqa: E731
    span = [10, 11, 12, 13]
    last = CFG.n_layers - 1
    par = patch_in_parallel(model, clean, corrupted, last, span, metric)
    it = patch_iteratively(model, clean, corrupted, last, span, metric, regenerate="greedy")
    assert par == it.metric
    assert len(it.produced_cosine) == 3 and all(-1 <= c <= 1 for c in it.produced_cosine)
    # Fixed inputs end in the same run at any layer.
    assert patch_in_parallel(model, clean, corrupted, 0, span, metric) == patch_iteratively(model, clean, corrupted, 0, span, metric).metric
    # Re-decoding the CoT under the patch at an early layer changes the inputs of span positions,
    # whose keys and values at layers up to the patch reach the answer position after the span.
    early = patch_iteratively(model, clean, corrupted, 0, span[:-1], metric, regenerate="greedy")
    assert early.metric != patch_in_parallel(model, clean, corrupted, 0, span[:-1], metric)


def test_iterative_with_continuous_thoughts(model, pair):
    clean, corrupted = pair
    embeds = model.W_E[corrupted].detach().clone()
    metric = lambda lg: lg[:, -1].float().log_softmax(-1)[:, 0]  # noqa: E731
    feedback = lambda h: h * 0.5  # noqa: E731  (a latent-CoT model feeds hidden states back)
    res = patch_iteratively(model, clean, None, 1, [10, 11, 12], metric, regenerate=feedback, corrupted_embeds=embeds)
    par = patch_in_parallel(model, clean, None, 1, [10, 11, 12], metric, corrupted_embeds=embeds)
    assert res.metric != par
    with pytest.raises(ValueError, match="corrupted_embeds"):
        patch_iteratively(model, clean, corrupted, 1, [10, 11], metric, regenerate=feedback)


def test_attribution_patching_correlates_with_exact_sweep_on_a_near_linear_model(pair):
    near_linear = _model(0.0)
    clean, corrupted = pair
    with torch.no_grad():  # corrupted tokens' embeddings near the clean ones ("12" vs "13"):
        for pos in (4, 9):  # a small perturbation, where the first-order estimate should hold
            emb = near_linear.embed.weight
            emb[corrupted[0, pos]] = emb[clean[0, pos]] + 0.1 * torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(pos))
    target = 17
    metric = lambda lg: lg[:, -1, target].float()  # noqa: E731
    exact = patch_layer_position(near_linear, clean, corrupted, metric=metric, progress=False)
    base = float(metric(near_linear(corrupted)[:, -1:].detach()))
    estimate = patch_by_attribution(near_linear, clean, corrupted, metric)
    corr = torch.corrcoef(torch.stack([(exact.values - base).flatten(), estimate.values.flatten()]))[0, 1]
    assert corr > 0.9, corr


def test_unequal_lengths_rejected(model):
    with pytest.raises(ValueError, match="equal lengths"):
        patch_layers(model, torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long), progress=False)


def test_run_sites_takes_negative_positions_and_refuses_sites_outside_the_blocks(model, pair):
    clean, corrupted = pair
    runs = prepare_runs(model, clean, corrupted, [get_act_name("resid_pre", 1)])
    metric = kl_metric(runs)
    by_neg, by_pos = run_sites(runs, [Site(get_act_name("resid_pre", 1), (-10,)), Site(get_act_name("resid_pre", 1), (4,))],
                               metric, progress=False)
    assert by_neg == by_pos and by_pos > 1e-3  # position 4 of 14 is where the prompts differ
    with pytest.raises(ValueError, match="blocks.0.hook_resid_pre"):
        run_sites(runs, [Site("hook_embed", (4,))], metric, progress=False)
    with pytest.raises(ValueError, match="outside the 14-token prompt"):
        run_sites(runs, [Site(get_act_name("resid_pre", 1), (14,))], metric, progress=False)


# ---------------------------------------------------------------- an independent oracle
# The engine batches rows, starts at the patched layer from a cached residual and keeps the
# corrupted run's keys and values before the patched position; the oracle below runs one full
# forward per site with plain `run_with_hooks` and a hand-written hook. The operations differ in
# order (attention over a cached prefix plus the new positions, batched rows, logits at the metric
# positions only), so the comparison is allclose in float32 at rtol = atol = 1e-5, not bitwise.
ORACLE_TOL = dict(rtol=1e-5, atol=1e-5)


def _answer_logprob(model, clean):
    target = int(model(clean)[0, -1].argmax())
    return lambda lg: lg[:, -1].float().log_softmax(-1)[:, target]


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


# ---------------------------------------------------------------- names
def test_old_names_warn_with_the_new_name_and_give_the_same_result(model, pair):
    import hookedcot.interp as interp
    from hookedcot.interp import sweeps

    clean, corrupted = pair
    metric = _answer_logprob(model, clean)
    sites = [Site(get_act_name("resid_pre", 1), (4,)), Site(get_act_name("z", 2), (9,), heads=(1,))]
    calls = {
        ("naive_patch_loop", "patch_naively"): lambda f: f(model, clean, corrupted, sites, metric),
        ("restoration_sweep", "trace_restoration"): lambda f: f(model, clean, [1, 2], layers=[0, 2], positions=[2, 5],
                                                                 progress=False).values,
        ("attribution_patch", "patch_by_attribution"): lambda f: f(model, clean, corrupted, metric, layers=[1]).values,
        ("parallel_patch", "patch_in_parallel"): lambda f: f(model, clean, corrupted, 1, [9, 10], metric),
        ("iterative_patch", "patch_iteratively"): lambda f: f(model, clean, corrupted, 1, [9, 10], metric,
                                                               regenerate="greedy").final_logits,
    }
    for (old, new), call in calls.items():
        expected = call(getattr(interp, new))
        with pytest.warns(DeprecationWarning, match=new):
            got = call(getattr(interp, old))
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected)), old
    with pytest.warns(DeprecationWarning, match="PATCH_COMPONENTS"):
        assert sweeps.COMPONENTS is sweeps.PATCH_COMPONENTS
    with pytest.raises(AttributeError):
        sweeps.NO_SUCH_NAME


def test_parallel_and_iterative_patching_reuse_prepared_runs(model, pair):
    clean, corrupted = pair
    metric = _answer_logprob(model, clean)
    runs = prepare_runs(model, clean, corrupted, [get_act_name("resid_post", 0)])
    for layer in (0, 2):
        assert patch_in_parallel(model, clean, corrupted, layer, [9, 11], metric, runs=runs) == \
            patch_in_parallel(model, clean, corrupted, layer, [9, 11], metric)
        reused = patch_iteratively(model, clean, corrupted, layer, [9, 11], metric, regenerate="greedy", runs=runs)
        fresh = patch_iteratively(model, clean, corrupted, layer, [9, 11], metric, regenerate="greedy")
        assert torch.equal(reused.final_logits, fresh.final_logits) and reused.produced_cosine == fresh.produced_cosine
    with pytest.raises(ValueError, match="greedy"):
        patch_iteratively(model, clean, None, 1, [9, 10], metric, regenerate="greedy",
                          corrupted_embeds=model.W_E[corrupted].detach())
    with pytest.raises(ValueError, match="regenerate must be"):
        patch_iteratively(model, clean, corrupted, 1, [9, 10], metric, regenerate="sample")
    # runs= holds the two runs: other inputs beside it are refused, not silently ignored
    assert patch_in_parallel(model, None, None, 1, [9, 11], metric, runs=runs) == \
        patch_in_parallel(model, clean, corrupted, 1, [9, 11], metric)
    with pytest.raises(ValueError, match="runs= already holds"):
        patch_in_parallel(model, corrupted, corrupted, 1, [9, 11], metric, runs=runs)
    with pytest.raises(ValueError, match="runs= already holds"):
        patch_in_parallel(model, clean, None, 1, [9, 11], metric, corrupted_embeds=model.W_E[corrupted].detach(), runs=runs)
    with pytest.raises(ValueError, match="produces input embeddings"):
        patch_iteratively(model, None, None, 1, [9, 11], metric, regenerate=lambda h: h, runs=runs)


def test_runs_record_later_hooks_under_their_source_hooks(model, pair):
    """A clean activation recorded later (`ensure`, e.g. another layer through runs=) sees the same
    source hooks as the ones recorded up front."""
    clean, corrupted = pair
    shift = ("blocks.0.hook_resid_post", lambda x, hook: x + 1.0)
    names = [get_act_name("resid_post", 1), get_act_name("resid_post", 2)]
    late = prepare_runs(model, clean, corrupted, names[:1], source_hooks=[shift]).ensure(names[1:])
    upfront = prepare_runs(model, clean, corrupted, names, source_hooks=[shift])
    assert torch.equal(late.clean_acts[names[1]], upfront.clean_acts[names[1]])


def test_a_span_or_site_selecting_no_position_is_an_error(model, pair):
    clean, corrupted = pair
    metric = _answer_logprob(model, clean)
    for call in (lambda: patch_in_parallel(model, clean, corrupted, 1, "from 20", metric),
                 lambda: patch_iteratively(model, clean, corrupted, 1, lambda p: p < 0, metric)):
        with pytest.raises(ValueError, match="selects no position"):
            call()
    runs = prepare_runs(model, clean, corrupted, [get_act_name("resid_pre", 1)])
    with pytest.raises(ValueError, match="selects no positions"):
        run_sites(runs, [Site(get_act_name("resid_pre", 1), ())], metric, progress=False)


def test_sites_the_engine_cannot_write_are_refused(model, pair):
    clean, corrupted = pair
    runs = prepare_runs(model, clean, corrupted, [get_act_name("z", 1), get_act_name("resid_pre", 0)])
    with pytest.raises(ValueError, match="both heads and neurons"):
        run_sites(runs, [Site(get_act_name("z", 1), (5, 7), heads=(1,), neurons=(3, 4))], lambda l: l[:, -1, 0])
    with pytest.raises(ValueError, match="never be written"):
        forward_patched(runs, [Site(get_act_name("resid_pre", 0), (3,))], start=2)
