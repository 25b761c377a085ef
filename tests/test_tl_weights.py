"""TransformerLens' weight names (tl_weights.py) and FactoredMatrix (factored_matrix.py): checked
against the checkpoint's own tensors, sliced by hand, against the cached activations of a forward
pass, and against dense products (torch.linalg on AB)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_checkpoint
from safetensors.torch import load_file

from hookedcot import HookedCoT
from hookedcot.factored_matrix import FactoredMatrix

# qwen2: q/k/v biases, GQA 2:1, tied; llama_bias: o and MLP biases, plain MHA; llama32: GQA 4:1, no bias.
WEIGHT_QUIRKS = ["qwen2", "llama_bias", "llama32"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tl_weights")
    return {name: build_tiny_checkpoint(name, root / name) for name in WEIGHT_QUIRKS}


@pytest.fixture(params=WEIGHT_QUIRKS)
def loaded(request, checkpoints):
    folder = checkpoints[request.param]
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return HookedCoT.from_pretrained(folder, dtype=torch.float32), tensors


def test_weight_stacks_are_the_checkpoints_tensors_sliced_per_head(loaded):
    model, ckpt = loaded
    c = model.cfg
    rep = c.n_heads // c.n_key_value_heads
    k = c.d_head
    W_Q, W_K, W_V, W_O = model.W_Q, model.W_K, model.W_V, model.W_O
    b_Q, b_K, b_V, b_O = model.b_Q, model.b_K, model.b_V, model.b_O
    assert W_Q.shape == (c.n_layers, c.n_heads, c.d_model, k) == W_K.shape == W_V.shape
    assert W_O.shape == (c.n_layers, c.n_heads, k, c.d_model)
    assert model._W_K.shape == (c.n_layers, c.n_key_value_heads, c.d_model, k) == model._W_V.shape
    for layer in range(c.n_layers):
        p = f"model.layers.{layer}.self_attn."
        for h in range(c.n_heads):
            g = h // rep  # the key/value head query head h reads
            q_rows, kv_rows = slice(h * k, (h + 1) * k), slice(g * k, (g + 1) * k)
            assert torch.equal(W_Q[layer, h], ckpt[p + "q_proj.weight"][q_rows].T)
            assert torch.equal(W_K[layer, h], ckpt[p + "k_proj.weight"][kv_rows].T)
            assert torch.equal(W_V[layer, h], ckpt[p + "v_proj.weight"][kv_rows].T)
            assert torch.equal(W_O[layer, h], ckpt[p + "o_proj.weight"][:, q_rows].T)
            for name, b, rows in (("q_proj", b_Q, q_rows), ("k_proj", b_K, kv_rows), ("v_proj", b_V, kv_rows)):
                want = ckpt.get(p + name + ".bias", torch.zeros(c.n_heads * k))[rows]
                assert torch.equal(b[layer, h], want)
        for g in range(c.n_key_value_heads):
            rows = slice(g * k, (g + 1) * k)
            assert torch.equal(model._W_K[layer, g], ckpt[p + "k_proj.weight"][rows].T)
            assert torch.equal(model.blocks[layer].attn._W_V[g], ckpt[p + "v_proj.weight"][rows].T)
        assert torch.equal(b_O[layer], ckpt.get(p + "o_proj.bias", torch.zeros(c.d_model)))
        m = f"model.layers.{layer}.mlp."
        assert torch.equal(model.W_in[layer], ckpt[m + "up_proj.weight"].T)
        assert torch.equal(model.W_gate[layer], ckpt[m + "gate_proj.weight"].T)
        assert torch.equal(model.W_out[layer], ckpt[m + "down_proj.weight"].T)
        assert torch.equal(model.b_in[layer], ckpt.get(m + "up_proj.bias", torch.zeros(c.d_mlp)))
        assert torch.equal(model.b_out[layer], ckpt.get(m + "down_proj.bias", torch.zeros(c.d_model)))
    assert torch.equal(model.W_E, ckpt["model.embed_tokens.weight"])
    assert model.embed.W_E is model.W_E or torch.equal(model.embed.W_E, model.W_E)
    unembed = ckpt.get("lm_head.weight", ckpt["model.embed_tokens.weight"])  # tied: the embedding
    assert torch.equal(model.W_U, unembed.T) and torch.equal(model.unembed.W_U, unembed.T)
    assert torch.equal(model.b_U, torch.zeros(c.d_vocab)) and torch.equal(model.unembed.b_U, model.b_U)


def test_per_block_weights_are_views_of_the_loaded_parameters_not_copies(loaded):
    model, _ = loaded
    names_before = set(model.state_dict())
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    views = [(attn.W_Q, attn.q_proj.weight), (attn._W_K, attn.k_proj.weight), (attn.W_O, attn.o_proj.weight),
             (mlp.W_in, mlp.up_proj.weight), (mlp.W_out, mlp.down_proj.weight), (model.W_U, model.unembed.weight),
             (model.embed.W_E, model.embed.weight)]
    for view, weight in views:
        assert view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    with torch.no_grad():
        attn.q_proj.weight[0, 5] += 1.0  # an edit to the weight shows in the view (row 0 = head 0, d_head 0)
        assert attn.W_Q[0, 5, 0] == attn.q_proj.weight[0, 5]
        attn.q_proj.weight[0, 5] -= 1.0
    assert set(model.state_dict()) == names_before  # nothing registered, nothing to save or load
    with pytest.raises(AttributeError):
        attn.W_Q = torch.zeros(1)  # read-only


def test_one_layers_attention_and_mlp_recomputed_from_the_weights_equal_the_cached_activations(loaded):
    model, _ = loaded
    c = model.cfg
    tokens = torch.randint(0, c.d_vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    tol = dict(rtol=1e-4, atol=1e-4)
    for layer in range(c.n_layers):
        attn = model.blocks[layer].attn
        x = cache[f"blocks.{layer}.ln1.hook_normalized"]  # b p d
        q = torch.einsum("bpd,hdk->bphk", x, model.W_Q[layer]) + model.b_Q[layer]
        torch.testing.assert_close(q, cache[f"blocks.{layer}.attn.hook_q"], **tol)
        key = torch.einsum("bpd,gdk->bpgk", x, attn._W_K) + attn._b_K
        torch.testing.assert_close(key, cache[f"blocks.{layer}.attn.hook_k"], **tol)
        v = torch.einsum("bpd,hdk->bphk", x, model.W_V[layer]) + model.b_V[layer]  # repeated per query head
        rep = c.n_heads // c.n_key_value_heads
        torch.testing.assert_close(v, cache[f"blocks.{layer}.attn.hook_v"].repeat_interleave(rep, dim=2), **tol)
        # the pattern from the cached rotated q and k (rotary is not a weight), then z and the output
        rot_q = cache[f"blocks.{layer}.attn.hook_rot_q"]
        rot_k = cache[f"blocks.{layer}.attn.hook_rot_k"].repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhk,bshk->bhqs", rot_q, rot_k) / c.d_head**0.5
        causal = torch.ones(11, 11, dtype=torch.bool).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqs,bshk->bqhk", pattern, v)
        torch.testing.assert_close(z, cache[f"blocks.{layer}.attn.hook_z"], **tol)
        attn_out = torch.einsum("bqhk,hkd->bqd", cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer]) + model.b_O[layer]
        torch.testing.assert_close(attn_out, cache[f"blocks.{layer}.hook_attn_out"], **tol)
        y = cache[f"blocks.{layer}.ln2.hook_normalized"]
        hidden = F.silu(y @ model.W_gate[layer] + model.b_gate[layer]) * (y @ model.W_in[layer] + model.b_in[layer])
        torch.testing.assert_close(hidden @ model.W_out[layer] + model.b_out[layer],
                                   cache[f"blocks.{layer}.hook_mlp_out"], **tol)
    final = cache["ln_final.hook_normalized"]
    torch.testing.assert_close(final @ model.W_U + model.b_U, logits, **tol)
    torch.testing.assert_close(model.W_E[tokens], cache["hook_embed"], rtol=0, atol=0)


def test_ov_and_qk_circuits_are_the_per_head_products(loaded):
    model, _ = loaded
    layer, head = model.cfg.n_layers - 1, model.cfg.n_heads - 1
    W_V, W_O, W_Q, W_K = model.W_V[layer, head], model.W_O[layer, head], model.W_Q[layer, head], model.W_K[layer, head]
    torch.testing.assert_close(model.OV[layer, head].AB, W_V @ W_O)
    torch.testing.assert_close(model.QK[layer, head].AB, W_Q @ W_K.T)
    torch.testing.assert_close(model.blocks[layer].attn.OV[head].AB, W_V @ W_O)
    assert model.OV.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    # TL's full OV circuit, W_E @ OV @ W_U, kept factored: its top-left corner and its norm
    full = model.W_E @ model.OV[layer, head] @ model.W_U
    dense = model.W_E @ W_V @ W_O @ model.W_U
    assert isinstance(full, FactoredMatrix) and full.shape == dense.shape
    torch.testing.assert_close(full.get_corner(4), dense[:4, :4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full.norm(), torch.linalg.matrix_norm(dense), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------- FactoredMatrix


def _fm(*lead, l=7, m=3, r=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FactoredMatrix(torch.randn(*lead, l, m, generator=g, dtype=torch.float64),
                          torch.randn(*lead, m, r, generator=g, dtype=torch.float64))


def test_factored_matrix_products_transpose_and_shape_match_the_dense_product():
    fm = _fm(2, 4)
    AB = fm.A @ fm.B
    assert fm.shape == (2, 4, 7, 6) and fm.ndim == 4 and fm.mdim == 3
    torch.testing.assert_close(fm.AB, AB)
    torch.testing.assert_close(fm.T.AB, AB.transpose(-2, -1))
    g = torch.Generator().manual_seed(1)
    for r in (2, 9):  # both of TL's branches: the new right factor narrower, and wider, than mdim
        right = torch.randn(6, r, generator=g, dtype=torch.float64)
        torch.testing.assert_close((fm @ right).AB, AB @ right)
        left = torch.randn(r, 7, generator=g, dtype=torch.float64)
        torch.testing.assert_close((left @ fm).AB, left @ AB)
    vec = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fm @ vec, AB @ vec)
    row = torch.randn(7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(row @ fm, row @ AB)
    other = _fm(2, 4, l=6, m=2, r=5, seed=3)
    torch.testing.assert_close((fm @ other).AB, AB @ other.AB)
    torch.testing.assert_close((2.5 * fm).AB, 2.5 * AB)
    square = _fm(l=5, r=5)
    torch.testing.assert_close(square.BA, square.B @ square.A)
    with pytest.raises(ValueError, match="square"):
        fm.BA
    with pytest.raises(AssertionError, match="inner dimension"):  # TL raised AssertionError: caught as before
        FactoredMatrix(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="mismatch"):  # and RuntimeError here
        FactoredMatrix(torch.randn(2, 3, 4), torch.randn(3, 4, 3))


def test_factored_svd_eigenvalues_and_norm_match_torch_linalg_on_the_dense_product():
    fm = _fm(2, l=7, m=3, r=6)
    AB = fm.AB
    U, S, V = fm.svd()
    assert U.shape == (2, 7, 3) and S.shape == (2, 3) and V.shape == (2, 6, 3)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), AB)
    torch.testing.assert_close(S, torch.linalg.svdvals(AB)[..., :3])
    with pytest.warns(DeprecationWarning):
        torch.testing.assert_close(fm.Vh, V)  # TL's Vh is V
    torch.testing.assert_close(U.transpose(-2, -1) @ U, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    torch.testing.assert_close(fm.norm(), torch.linalg.matrix_norm(AB))
    torch.testing.assert_close(fm.U @ fm.collapse_l(), AB)
    torch.testing.assert_close(fm.collapse_r() @ fm.V.transpose(-2, -1), AB)
    torch.testing.assert_close(fm.make_even().AB, AB)
    square = _fm(l=6, m=2, r=6, seed=5)
    dense = torch.linalg.eigvals(square.AB)
    top = dense[dense.abs().argsort(descending=True)][:2]  # AB's non-zero eigenvalues (rank 2)
    ours = square.eigenvalues
    key = lambda e: sorted(e.tolist(), key=lambda z: (round(z.real, 6), round(z.imag, 6)))  # noqa: E731
    for a, b in zip(key(ours), key(top)):
        assert abs(a - b) < 1e-8


def test_factored_indexing_follows_transformer_lens_rules():
    fm = _fm(3, 4)
    AB = fm.AB
    torch.testing.assert_close(fm[1].AB, AB[1])
    torch.testing.assert_close(fm[1, 2].AB, AB[1, 2])
    torch.testing.assert_close(fm[:, -1].AB, AB[:, -1])
    torch.testing.assert_close(fm[1, 2, 5].AB, AB[1, 2, 5:6])  # a row index keeps its dimension
    torch.testing.assert_close(fm[1, 2, -1, 3].AB, AB[1, 2, -1:, 3:4])
    with pytest.raises(IndexError):
        fm[0, 0, 0, 0, 0]
    torch.testing.assert_close(fm.get_corner(2), AB[:2, :2, :2, :2])
    torch.testing.assert_close(fm.unsqueeze(0).AB, AB[None])
