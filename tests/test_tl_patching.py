"""tl_patching (TransformerLens' `patching` functions on the batched engine) against a naive loop
written here: one `run_with_hooks` per patch, the clean activation copied in by a plain hook."""

from __future__ import annotations

import pytest
import torch

from hookedcot import tl_patching as patching
from patching_pair import CFG, model, pair  # noqa: F401  (fixtures)

TOL = dict(rtol=1e-5, atol=1e-5)
L, H, G = CFG.n_layers, CFG.n_heads, CFG.n_key_value_heads


@pytest.fixture(scope="module")
def setup(model, pair):  # noqa: F811
    clean, corrupted = pair
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        target = int(model(clean)[0, -1].argmax())
    weights = torch.linspace(0.5, 1.5, clean.shape[1])

    def metric(logits):  # TL's shape: every position's logits in, one number out
        return (logits.log_softmax(-1)[:, :, target] * weights).sum(-1).mean()

    return corrupted, clean_cache, metric


def _oracle(model, corrupted, clean_cache, metric, name, index):  # noqa: F811
    def hook(x, hook):
        x = x.clone()
        x[index] = clean_cache[name][index]
        return x

    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])))


ALL = slice(None)


def test_layer_position_patches_equal_the_naive_loop(model, setup):  # noqa: F811
    corrupted, cache, metric = setup
    n_pos = corrupted.shape[1]
    for fn, act in ((patching.get_act_patch_resid_pre, "resid_pre"), (patching.get_act_patch_resid_mid, "resid_mid"),
                    (patching.get_act_patch_attn_out, "attn_out"), (patching.get_act_patch_mlp_out, "mlp_out")):
        ours = fn(model, corrupted, cache, metric)
        assert ours.shape == (L, n_pos)
        want = torch.tensor([[_oracle(model, corrupted, cache, metric, f"blocks.{layer}.hook_{act}", (ALL, p))
                              for p in range(n_pos)] for layer in range(L)])
        torch.testing.assert_close(ours, want, **TOL)
        assert ours.std() > 1e-3  # the patches do something


def test_head_patches_at_all_positions_equal_the_naive_loop_with_key_value_heads_for_k_and_v(model, setup):  # noqa: F811
    corrupted, cache, metric = setup
    for fn, act, n in ((patching.get_act_patch_attn_head_out_all_pos, "z", H),
                       (patching.get_act_patch_attn_head_q_all_pos, "q", H),
                       (patching.get_act_patch_attn_head_k_all_pos, "k", G),
                       (patching.get_act_patch_attn_head_v_all_pos, "v", G)):
        ours = fn(model, corrupted, cache, metric)
        assert ours.shape == (L, n)
        want = torch.tensor([[_oracle(model, corrupted, cache, metric, f"blocks.{layer}.attn.hook_{act}", (ALL, ALL, h))
                              for h in range(n)] for layer in range(L)])
        torch.testing.assert_close(ours, want, **TOL)
    ours = patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, cache, metric)
    want = torch.tensor([[_oracle(model, corrupted, cache, metric, f"blocks.{layer}.attn.hook_pattern", (ALL, h))
                          for h in range(H)] for layer in range(L)])  # pattern: b h q s
    torch.testing.assert_close(ours, want, **TOL)


def test_head_patches_by_position_equal_the_naive_loop(model, setup):  # noqa: F811
    corrupted, cache, metric = setup
    n_pos = corrupted.shape[1]
    for fn, act, n in ((patching.get_act_patch_attn_head_out_by_pos, "z", H),
                       (patching.get_act_patch_attn_head_v_by_pos, "v", G)):
        ours = fn(model, corrupted, cache, metric)
        assert ours.shape == (L, n_pos, n)
        want = torch.tensor([[[_oracle(model, corrupted, cache, metric, f"blocks.{layer}.attn.hook_{act}", (ALL, p, h))
                               for h in range(n)] for p in range(n_pos)] for layer in range(L)])
        torch.testing.assert_close(ours, want, **TOL)
    ours = patching.get_act_patch_attn_head_pattern_by_pos(model, corrupted, cache, metric)
    assert ours.shape == (L, H, n_pos)  # TL's order for patterns: head before destination position
    layer = 2
    want = torch.tensor([[_oracle(model, corrupted, cache, metric, f"blocks.{layer}.attn.hook_pattern", (ALL, h, p))
                          for p in range(n_pos)] for h in range(H)])
    torch.testing.assert_close(ours[layer], want, **TOL)


def test_every_stacks_equal_the_single_sweeps_with_key_value_heads_padded(model, setup):  # noqa: F811
    corrupted, cache, metric = setup
    block = patching.get_act_patch_block_every(model, corrupted, cache, metric)
    assert block.shape == (3, L, corrupted.shape[1])
    for i, fn in enumerate((patching.get_act_patch_resid_pre, patching.get_act_patch_attn_out, patching.get_act_patch_mlp_out)):
        torch.testing.assert_close(block[i], fn(model, corrupted, cache, metric), **TOL)
    heads = patching.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric)
    assert heads.shape == (5, L, H)
    torch.testing.assert_close(heads[2, :, :G], patching.get_act_patch_attn_head_k_all_pos(model, corrupted, cache, metric), **TOL)
    assert torch.equal(heads[2:4, :, G:], torch.zeros(2, L, H - G))
    torch.testing.assert_close(heads[4], patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, cache, metric), **TOL)
    by_pos = patching.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, metric)
    assert by_pos.shape == (5, L, corrupted.shape[1], H)
    torch.testing.assert_close(by_pos[4], patching.get_act_patch_attn_head_pattern_by_pos(model, corrupted, cache, metric)
                               .transpose(1, 2), **TOL)


def test_patching_the_corrupted_runs_own_cache_changes_nothing(model, setup):  # noqa: F811
    corrupted, _, metric = setup
    with torch.no_grad():
        logits, own = model.run_with_cache(corrupted)
    base = float(metric(logits))
    ours = patching.get_act_patch_resid_pre(model, corrupted, own, metric)
    torch.testing.assert_close(ours, torch.full_like(ours, base), **TOL)


def test_a_batch_of_corrupted_prompts_is_patched_row_by_row_under_a_batch_metric(model, pair):  # noqa: F811
    clean, corrupted = pair
    clean2, corrupted2 = torch.cat([clean, clean.flip(1)]), torch.cat([corrupted, corrupted.flip(1)])
    with torch.no_grad():
        _, cache = model.run_with_cache(clean2)

    def metric(logits):
        return logits[:, -1, 5].mean() - logits[:, -1, 9].mean()

    ours = patching.get_act_patch_attn_out(model, corrupted2, cache, metric)
    want = torch.tensor([[_oracle(model, corrupted2, cache, metric, f"blocks.{layer}.hook_attn_out", (ALL, p))
                          for p in range(corrupted2.shape[1])] for layer in range(L)])
    torch.testing.assert_close(ours, want, **TOL)
    heads = patching.get_act_patch_attn_head_k_by_pos(model, corrupted2, cache, metric)
    torch.testing.assert_close(heads[1, 6, 1], torch.tensor(
        _oracle(model, corrupted2, cache, metric, "blocks.1.attn.hook_k", (ALL, 6, 1))), **TOL)


def test_a_clean_cache_without_the_patched_hook_is_refused_with_the_fix(model, pair):  # noqa: F811
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with pytest.raises(KeyError, match="without a names_filter"):
        patching.get_act_patch_mlp_out(model, corrupted, cache, lambda lg: lg[0, -1, 0])


def test_generic_patch_with_tl_setters_equals_the_batched_sweeps_and_its_index_table(model, setup):  # noqa: F811
    corrupted, cache, metric = setup
    generic = patching.generic_activation_patch(model, corrupted, cache, metric, patching.layer_pos_patch_setter,
                                                "mlp_out", index_axis_names=("layer", "pos"))
    torch.testing.assert_close(generic, patching.get_act_patch_mlp_out(model, corrupted, cache, metric), **TOL)
    heads, df = patching.generic_activation_patch(
        model, corrupted, cache, metric, patching.layer_head_vector_patch_setter, "k",
        index_axis_names=("layer", "head"), return_index_df=True)
    assert heads.shape == (L, G) and len(df) == L * G and list(df.columns) == ["layer", "head"]
    torch.testing.assert_close(heads, patching.get_act_patch_attn_head_k_all_pos(model, corrupted, cache, metric), **TOL)
    flat = patching.generic_activation_patch(model, corrupted, cache, metric, patching.layer_head_pattern_patch_setter,
                                             "pattern", index_df=df.iloc[[1, 6]])
    all_pos = patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, cache, metric)
    torch.testing.assert_close(flat, torch.stack([all_pos[0, 1], all_pos[3, 0]]), **TOL)


def test_one_pattern_entry_patched_equals_the_naive_loop(model, pair):  # noqa: F811
    clean, corrupted = pair
    clean, corrupted = clean[:, 2:6], corrupted[:, 2:6]  # n_layers * n_heads * pos * pos forwards: a short prompt
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1].log_softmax(-1)[11]

    ours = patching.get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted, cache, metric)
    assert ours.shape == (L, H, 4, 4)
    for layer, h, dest, src in ((1, 2, 3, 3), (3, 0, 3, 0), (0, 3, 2, 1)):
        want = _oracle(model, corrupted, cache, metric, f"blocks.{layer}.attn.hook_pattern", (ALL, h, dest, src))
        torch.testing.assert_close(ours[layer, h, dest, src], torch.tensor(want), **TOL)
    with torch.no_grad():
        base = float(metric(model(corrupted)))
    future = torch.ones(4, 4, dtype=torch.bool).triu(1)  # src after dest: 0 in both runs' patterns
    torch.testing.assert_close(ours[:, :, future], torch.full_like(ours[:, :, future], base), **TOL)
    assert (ours[:, :, ~future] - base).abs().max() > 1e-4
