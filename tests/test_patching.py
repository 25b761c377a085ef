"""The patching engine and the sweeps on it: identities that must hold, and agreement with the
slow obvious loop (one hooked forward per site); old names and refused sites."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hookedcot import ModelConfig, get_act_name
from hookedcot.interp.attribution import patch_by_attribution
from hookedcot.interp.iterative import patch_in_parallel, patch_iteratively
from hookedcot.interp.patching import Site, forward_patched, kl_metric, prepare_runs, run_sites
from hookedcot.interp.sweeps import (
    patch_components, patch_heads, patch_layer_position, patch_layers, patch_naively,
)
from hookedcot.interp.tracing import trace_restoration
from patching_pair import CFG, _model, answer_logprob as _answer_logprob, model, pair  # noqa: F401  (fixtures)


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
