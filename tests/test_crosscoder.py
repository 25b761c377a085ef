"""Crosscoders: recovery of known sparse features shared by / private to two "models", the
single-model view spliced into a real model (identity when nothing is edited), save / load,
seeded and resumable training, feature statistics and latent scaling against naive oracles."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from hookedcot import ModelConfig
from hookedcot.dictionaries import (CrossCoder, FeatureEdit, FeatureStats, feature_stats,
                                    fraction_of_variance_explained, latent_scaling, train_crosscoder)
from model_factory import random_model

D, N_TRUE, D_LATENT, HOOK = 32, 48, 96, "blocks.1.hook_resid_post"
KINDS = ["shared"] * 24 + ["base"] * 12 + ["child"] * 12
SETTINGS = {"l1": dict(l1_coeff=0.1, lr=3e-3), "batchtopk": dict(k=3, lr=1e-2)}


def true_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions [N_TRUE, 2, D]: shared ones appear in both models (the child's scaled by c in
    [0.7, 1.3]), base-only ones have a zero child direction and child-only ones a zero base one."""
    g = torch.Generator().manual_seed(1)
    dirs = torch.randn(N_TRUE, 2, D, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    scale = torch.ones(N_TRUE)
    for j, kind in enumerate(KINDS):
        if kind == "shared":
            scale[j] = 0.7 + 0.6 * torch.rand(1, generator=g).item()
            dirs[j, 1] = dirs[j, 0] * scale[j]
        else:
            dirs[j, 1 if kind == "base" else 0] = 0
    return dirs, scale


DIRS, SHARED_SCALE = true_features()


def synthetic(seed: int, batch: int = 256, p: float = 0.06, n_batches: int | None = None):
    """Batches [batch, 2, D]: each true feature fires with probability p, coefficient U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    i = 0
    while n_batches is None or i < n_batches:
        coef = (torch.rand(batch, N_TRUE, generator=g) < p) * (0.5 + torch.rand(batch, N_TRUE, generator=g))
        yield torch.einsum("bf,fmd->bmd", coef, DIRS)
        i += 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These are many tiny matmuls: on a shared machine extra threads only contend (10-30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["l1", "batchtopk"])
def trained(request):
    coder, log = train_crosscoder(synthetic(0), d_latent=D_LATENT, architecture=request.param, steps=800,
                                  models=["base", "child"], hook_name=HOOK, progress=False, **SETTINGS[request.param])
    return coder, log


def best_matches(coder: CrossCoder) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true feature: the largest cosine with a learned decoder (both models' halves
    concatenated) and that latent's index."""
    learned = coder.W_dec.reshape(coder.d_latent, -1)
    learned = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    true = DIRS.reshape(N_TRUE, -1)
    return (true / true.norm(dim=-1, keepdim=True) @ learned.T).max(dim=1)


def test_training_recovers_the_true_features_and_their_owners(trained):
    coder, log = trained
    cos, latent = best_matches(coder)
    recovered = cos > 0.9
    norms = coder.decoder_norms()[latent]
    relative = norms[:, 1] / norms.sum(-1)
    owner = ["base" if r < 0.1 else "child" if r > 0.9 else "shared" for r in relative.tolist()]
    right = sum(recovered[j].item() and owner[j] == KINDS[j] for j in range(N_TRUE))
    fve = fraction_of_variance_explained(coder, synthetic(99, n_batches=4))
    print(f"\n{coder.architecture}: recovered {recovered.float().mean():.3f} of {N_TRUE} true features (cos > 0.9), "
          f"owner right for {right}/{int(recovered.sum())}, FVE {fve}, {log.seconds[-1]:.1f} s for {len(log)} steps")
    assert recovered.float().mean() >= 0.9
    assert right >= 0.9 * recovered.sum()
    assert set(fve) == {"base", "child"} and min(fve.values()) > 0.8
    assert log.mse[-1] < 0.1 * log.mse[0]
    if coder.architecture == "batchtopk":
        assert coder.threshold is not None and coder.threshold > 0 and log.sparsity[-1] == pytest.approx(3.0)


def test_latent_scaling_equals_a_least_squares_fit_over_all_tokens(trained):
    coder, _ = trained
    scale = torch.tensor([2.0, 0.5])  # raw activations = normalised ones / scale: the fit is in the normalised space
    coder = CrossCoder(coder.W_enc, coder.b_enc, coder.W_dec, coder.b_dec, input_scale=scale,
                       architecture=coder.architecture, k=coder.k, threshold=coder.threshold, models=coder.models)
    batches = list(synthetic(5, n_batches=3))
    features = best_matches(coder)[1][::6].tolist()
    scaling = latent_scaling(coder, [b / scale[:, None] for b in batches], features)
    # the slow obvious fit: stack every token, solve the least-squares problem per feature and model
    x = torch.cat(batches).double()
    f = torch.cat([coder.encode(b / scale[:, None]) for b in batches]).double()
    W = coder.W_dec.detach().double()
    recon = torch.einsum("bl,lmd->bmd", f, W) + coder.b_dec.double()
    for i, j in enumerate(features):
        a = (f[:, j, None] * W[j, 1]).reshape(-1, 1)  # the child's decoder direction, scaled per token
        for m in range(2):
            for target, beta in ((x[:, m] - recon[:, m] + f[:, j, None] * W[j, m], scaling.beta_error),
                                 (recon[:, m], scaling.beta_reconstruction)):
                expected = torch.linalg.lstsq(a, target.reshape(-1, 1)).solution.item()
                assert beta[i, m].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert torch.allclose(scaling.nu_error, scaling.beta_error[:, 0] / scaling.beta_error[:, 1])


def exact_coder() -> tuple[CrossCoder, torch.Tensor]:
    """A crosscoder that reads 16 orthonormal features exactly: 8 shared (the child's direction is
    the base's times c), 4 base-only, 4 child-only."""
    g = torch.Generator().manual_seed(8)
    q = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T[:16]  # orthonormal rows
    c = 0.6 + 0.8 * torch.rand(8, generator=g)
    dirs = torch.zeros(16, 2, D)
    dirs[:8, 0], dirs[:8, 1] = q[:8], q[:8] * c[:, None]
    dirs[8:12, 0], dirs[12:, 1] = q[8:12], q[12:]
    enc = dirs / dirs.pow(2).sum((1, 2))[:, None, None]  # pre_j = coefficient_j exactly
    coder = CrossCoder(enc.permute(1, 2, 0).contiguous(), torch.zeros(16), dirs.clone(), torch.zeros(2, D),
                       models=["base", "chat"])
    return coder, c


def test_latent_scaling_tells_a_child_only_latent_from_a_shared_one_whose_base_decoder_shrank():
    coder, c = exact_coder()
    g = torch.Generator().manual_seed(9)
    coef = (torch.rand(2000, 16, generator=g) < 0.2) * torch.rand(2000, 16, generator=g)
    x = torch.einsum("bf,fmd->bmd", coef, coder.W_dec)
    assert torch.allclose(coder.encode(x), coef, atol=1e-5)
    coder.W_dec[0, 0] = 0  # Complete Shrinkage: shared latent 0 now looks chat-only by its decoder norms
    norms = coder.decoder_norms()
    assert norms[0, 0] == 0 and norms[0, 1] > 0
    scaling = latent_scaling(coder, x.split(300), [0, 1, 2, 12, 13])
    assert scaling.nu_error[:3].tolist() == pytest.approx((1 / c[:3]).tolist(), rel=1e-4)  # the base has it, / c
    assert scaling.nu_error[3:].abs().max() < 1e-5  # chat-only: the base lacks the direction
    assert scaling.nu_reconstruction[0].abs() < 1e-5  # the base reconstruction lost it with the decoder
    assert scaling.nu_reconstruction[1:3].tolist() == pytest.approx((1 / c[1:3]).tolist(), rel=1e-4)
    assert scaling.flags(0.3) == ["complete shrinkage", "complete shrinkage, latent decoupling",
                                  "complete shrinkage, latent decoupling", "chat-specific", "chat-specific"]
    assert scaling.count.tolist() == (coder.encode(x)[:, [0, 1, 2, 12, 13]] > 0).sum(0).tolist()
    dead = latent_scaling(coder, [torch.zeros(4, 2, D)], [0])
    assert dead.flags() == ["inactive"]


def test_latent_scaling_flags_a_chat_only_latent_that_a_base_only_latent_rebuilds_in_the_base():
    coder, _ = exact_coder()
    u = coder.W_dec[12, 1].clone()  # chat-only latent 12's direction ...
    coder.W_dec[8, 0] = u  # ... is also base-only latent 8's, and the two fire together: Latent Decoupling
    coder.W_enc[0, :, 8] = u
    g = torch.Generator().manual_seed(10)
    coef = (torch.rand(1000, 16, generator=g) < 0.2) * torch.rand(1000, 16, generator=g)
    coef[:, 8] = coef[:, 12]
    x = torch.einsum("bf,fmd->bmd", coef, coder.W_dec)
    assert torch.allclose(coder.encode(x), coef, atol=1e-5)
    scaling = latent_scaling(coder, [x], [12])
    assert scaling.nu_reconstruction.item() == pytest.approx(1.0, rel=1e-4)  # the base reconstruction has it
    assert abs(scaling.nu_error.item()) < 1e-4  # nothing left for latent 12 to explain in the base
    assert scaling.flags(0.3) == ["latent decoupling"]


# ------------------------------------------------------------------------------- hooks on a model
CFG = ModelConfig(n_layers=3, d_model=D, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                  norm_eps=1e-6, model_name="tiny")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


def random_coder(arch: str = "l1") -> CrossCoder:
    g = torch.Generator().manual_seed(3)
    return CrossCoder(torch.randn(2, D, 48, generator=g) * 0.3, torch.randn(48, generator=g) * 0.1 - 0.2,
                      torch.randn(48, 2, D, generator=g) * 0.3, torch.randn(2, D, generator=g) * 0.1,
                      input_scale=torch.tensor([0.8, 1.7]), architecture=arch, k=5,
                      threshold=0.3 if arch != "l1" else None, models=["base", "child"], hook_name=HOOK)


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_the_single_model_view_is_the_joint_latent_with_the_other_input_zero(arch):
    coder = random_coder(arch)
    x = torch.randn(5, 7, D)
    zeros = torch.zeros_like(x)
    assert torch.equal(coder.encode(x, model="base"), coder.encode(torch.stack([x, zeros], -2)))
    assert torch.equal(coder.encode(x, model=1), coder.encode(torch.stack([zeros, x], -2)))
    f = coder.encode(torch.stack([x, x], -2))
    by_hand = torch.relu((x * 0.8) @ coder.W_enc[0] + (x * 1.7) @ coder.W_enc[1] + coder.b_enc)
    if arch == "batchtopk":
        by_hand = by_hand * (by_hand * coder.W_dec.norm(dim=-1).sum(-1) > 0.3)
    assert torch.allclose(f, by_hand, atol=1e-5) and (f == 0).any() and (f > 0).any()
    both = coder.decode(f)
    assert torch.allclose(both[..., 1, :], (f @ coder.W_dec[:, 1] + coder.b_dec[1]) / 1.7, atol=1e-5)
    assert torch.equal(coder.decode(f, model="child"), coder.decode(f, model=-1))


@pytest.mark.parametrize("which", ["base", "child"])
def test_attached_with_the_error_term_the_crosscoder_is_the_identity_bitwise(model, which):
    coder = random_coder()
    tokens = torch.randint(0, 128, (2, 9))
    plain = model(tokens)

    def run(edit=None, **kw):
        return model.run_with_hooks(tokens, fwd_hooks=[coder.hook(which, edit, **kw)])

    assert torch.equal(run(), plain)
    acts = coder.encode(model.run_with_cache(tokens, names_filter=[HOOK])[1][HOOK], model=which)
    pos, feature = (acts == 0).all(dim=0).nonzero()[0].tolist()
    assert torch.equal(run(FeatureEdit("zero", [feature], positions=[pos])), plain)  # zeroing a zero
    assert torch.equal(run(FeatureEdit("scale", None, 1.0)), plain)
    live_pos, live = (acts[0] > 0).nonzero()[0].tolist()
    edited = run(FeatureEdit("zero", [live], positions=[live_pos]))
    assert not torch.equal(edited, plain) and torch.equal(edited[:, :live_pos], plain[:, :live_pos])
    assert not torch.equal(run(error=False), plain)  # the reconstruction alone is not the activation


def test_the_hook_edits_the_single_model_view_and_writes_that_models_decoding(model):
    coder = random_coder()
    tokens = torch.randint(0, 128, (1, 6))
    x = model.run_with_cache(tokens, names_filter=[HOOK])[1][HOOK]
    seen = {}

    def keep(features, hook):
        seen["features"] = features
        return features * 2

    name, fn = coder.hook("child", keep, error=False)
    out = fn(x, None)
    f = torch.relu((x * 1.7) @ coder.W_enc[1] + coder.b_enc)
    assert name == HOOK and torch.allclose(seen["features"], f, atol=1e-5)
    assert torch.allclose(out, (2 * f @ coder.W_dec[:, 1] + coder.b_dec[1]) / 1.7, atol=1e-4)
    with pytest.raises(KeyError, match="its models are"):
        coder.hook("chat")


# ---------------------------------------------------------------------------- files and training
def test_save_and_load_round_trip_bitwise_and_bad_folders_are_refused(tmp_path, trained):
    coder, _ = trained
    folder = coder.save(tmp_path / "cc")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format"] == 1 and cfg["models"] == ["base", "child"] and cfg["hook_name"] == HOOK
    assert cfg["d_in"] == D and cfg["d_latent"] == D_LATENT and cfg["architecture"] == coder.architecture
    again = CrossCoder.load(folder)
    for name, tensor in coder.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    for attr in ("threshold", "k", "models", "hook_name", "architecture"):
        assert getattr(again, attr) == getattr(coder, attr), attr
    x = next(synthetic(7))
    assert torch.equal(again.encode(x), coder.encode(x))
    with pytest.raises(FileNotFoundError, match="config.json"):
        CrossCoder.load(tmp_path / "missing")
    cfg["d_in"] = 16
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"W_enc has shape \(2, 32, 96\).*\[2, 16, 96\]"):
        CrossCoder.load(folder)
    with pytest.raises(ValueError, match="W_dec"):
        CrossCoder(coder.W_enc, coder.b_enc, coder.W_dec.transpose(0, 1), coder.b_dec)


def test_training_is_seeded_and_a_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path):
    kw = dict(d_latent=D_LATENT, architecture="batchtopk", k=3, lr=1e-2, steps=60, progress=False)
    a, log_a = train_crosscoder(synthetic(0), checkpoint_dir=tmp_path / "run", checkpoint_every=25, **kw)
    b, _ = train_crosscoder(synthetic(0), **kw)
    c, _ = train_crosscoder(synthetic(0), seed=1, **kw)
    assert all(torch.equal(a.state_dict()[n], t) for n, t in b.state_dict().items()) and a.threshold == b.threshold
    assert not torch.equal(a.W_dec, c.W_dec)
    saved = sorted(p.name for p in (tmp_path / "run").glob("step_*.pt"))
    assert saved == ["step_00000025.pt", "step_00000050.pt", "step_00000060.pt"]
    for name in saved[1:]:  # interrupted after step 25
        (tmp_path / "run" / name).unlink()
    resumed, log_r = train_crosscoder(synthetic(0), checkpoint_dir=tmp_path / "run", checkpoint_every=25, **kw)
    assert all(torch.equal(resumed.state_dict()[n], t) for n, t in a.state_dict().items())
    assert resumed.threshold == a.threshold and log_r.loss == log_a.loss and len(log_r) == 60
    fresh, _ = train_crosscoder(synthetic(0), checkpoint_dir=tmp_path / "run", resume=False, **kw)
    assert torch.equal(fresh.W_dec, a.W_dec)
    with pytest.raises(ValueError, match=r"k: 3 then, 4 now.*resume=False"):  # other settings never resume silently
        train_crosscoder(synthetic(0), checkpoint_dir=tmp_path / "run", **{**kw, "k": 4})
    with pytest.raises(ValueError, match="input_scale"):
        train_crosscoder(synthetic(0), checkpoint_dir=tmp_path / "run", input_scale=[2.0, 2.0], **kw)


def test_the_loss_curve_is_written_as_a_png_without_pyplot_state(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    _, log = train_crosscoder(synthetic(0), d_latent=16, steps=5, progress=False, plot=tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(log) == 5
    assert plt.get_fignums() == before


# ------------------------------------------------------------------------- a store and its stats
@dataclass
class Batch:
    acts: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    sequences: torch.Tensor


class FakeStore:
    """The activation store protocol over tensors in memory: `n_seq` sequences of `seq_len` tokens,
    model activations at raw scales 3 (base) and 0.5 (child)."""

    models = ["base", "child"]
    hook_names = [HOOK]

    def __init__(self, n_seq: int = 8, seq_len: int = 40):
        self.acts = next(synthetic(11, batch=n_seq * seq_len)) * torch.tensor([3.0, 0.5])[:, None]
        g = torch.Generator().manual_seed(4)
        self.tokens = torch.randint(0, 26, (n_seq, seq_len), generator=g)
        self.n_tokens, self.seq_len = n_seq * seq_len, seq_len

    def scale(self, hook_name):
        return D ** 0.5 / self.acts.norm(dim=-1).mean(0)

    def sequence_tokens(self, seq):
        return self.tokens[seq]

    def batches(self, hook_name, batch_size, *, shuffle=True, seed=0, epochs=1, models=None, normalize=False):
        assert hook_name == HOOK and not normalize
        epoch = 0
        while epochs is None or epoch < epochs:
            g = torch.Generator().manual_seed(seed + epoch)
            order = torch.randperm(self.n_tokens, generator=g) if shuffle else torch.arange(self.n_tokens)
            for i in range(0, self.n_tokens, batch_size):
                idx = order[i:i + batch_size]
                yield Batch(self.acts[idx], self.tokens.reshape(-1)[idx], idx % self.seq_len, idx // self.seq_len)
            epoch += 1


class Letters:
    def decode(self, ids):
        return "".join(chr(97 + int(i)) for i in ids)


def test_training_on_a_store_takes_its_scale_and_models_and_reconstructs_raw_activations():
    store = FakeStore()
    coder, _ = train_crosscoder(store, hook_name=HOOK, d_latent=D_LATENT, architecture="batchtopk", k=3, lr=1e-2,
                                steps=300, batch_size=64, progress=False)
    assert torch.equal(coder.input_scale, store.scale(HOOK))
    assert coder.models == store.models and coder.hook_name == HOOK
    fve = fraction_of_variance_explained(coder, store)
    assert min(fve.values()) > 0.8, fve


def test_feature_stats_match_a_by_hand_count_and_point_at_the_top_tokens(tmp_path, trained):
    coder, _ = trained
    store = FakeStore()
    coder = CrossCoder(coder.W_enc, coder.b_enc, coder.W_dec, coder.b_dec, input_scale=torch.tensor([1 / 3, 2.0]),
                       architecture=coder.architecture, k=coder.k, threshold=coder.threshold, models=coder.models,
                       hook_name=HOOK)  # the store's raw scales undone: the activations it was trained on
    stats = feature_stats(coder, store, top_k=3, context=4, batch_size=50, thresholds=(0.1, 0.9))
    f = coder.encode(store.acts)
    assert stats.n_tokens == store.n_tokens
    assert torch.allclose(stats.frequency, (f > 0).float().mean(0))
    assert torch.allclose(stats.mean_activation, f.mean(0), atol=1e-6)
    norms = coder.W_dec.norm(dim=-1)
    assert torch.allclose(stats.relative_norm, norms[:, 1] / norms.sum(-1))
    j = int(f.sum(0).argmax())
    top = stats.contexts[j][0]
    flat = int(f[:, j].argmax())
    assert (top.sequence, top.position) == (flat // store.seq_len, flat % store.seq_len)
    assert top.activation == pytest.approx(float(f[flat, j]))
    lo = max(top.position - 4, 0)
    assert top.tokens == store.tokens[top.sequence, lo:top.position + 3].tolist()
    assert top.tokens[top.index] == store.tokens[top.sequence, top.position]
    assert all(stats.classes[i] == "dead" for i in range(D_LATENT) if f[:, i].max() == 0)
    assert stats.top(5, by="frequency") == (f > 0).float().mean(0).argsort(descending=True, stable=True)[:5].tolist()
    child_only = stats.top(100, cls="child-only")
    assert child_only and all(stats.relative_norm[i] > 0.9 for i in child_only)
    text = stats.describe(j, Letters())
    assert f"[[{chr(97 + top.tokens[top.index])}]]" in text.splitlines()[1]
    again = FeatureStats.load(stats.save(tmp_path / "stats.json"))
    assert again.classes == stats.classes and again.contexts == stats.contexts
    assert torch.equal(again.frequency, stats.frequency) and len(again.to_rows()) == D_LATENT
    pd = pytest.importorskip("pandas")
    assert isinstance(stats.to_pandas(), pd.DataFrame)
