"""The seed examples (examples/seed*.py) run end to end and write what they promise.

Fast: each example's `main([...])` in-process on a tiny random-weight model with a one-token-per-
character tokenizer (digits are single tokens, as in SmolLM2 / Qwen2), small spans and few layers.
The model is handed to the examples by replacing `_common.load_model`. Slow (`-m slow`): the same
on the embedded SmolLM2-135M-Instruct. Assertions are on files, keys and identities, not timings.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hookedcot import HookedCoT, ModelConfig
from model_factory import CharTokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
import seed000_layer_criticality as seed000  # noqa: E402
import seed001_layerwise_patching as seed001  # noqa: E402
import seed002_position_patching as seed002  # noqa: E402
import seed004_iterative_vs_parallel as seed004  # noqa: E402


@pytest.fixture(scope="module")
def tiny() -> HookedCoT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                      norm_eps=1e-6, model_name="tiny-char")
    m = HookedCoT(cfg, tokenizer=CharTokenizer()).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def run(module, model, monkeypatch, out: Path, *extra: str) -> dict:
    monkeypatch.setattr(_common, "load_model", lambda args: model)
    results = module.main(["--n-pairs", "1", "--out", str(out), *extra])
    assert (out / "summary.md").read_text().startswith("# ")
    on_disk = json.loads((out / "results.json").read_text())
    assert set(results) == set(on_disk)
    return on_disk


FAST_ARGS = {
    "seed000": ("--trace-span", "last 3", "--max-new-tokens", "4"),
    "seed001": ("--span", "cot-last 4"),
    "seed002": ("--span", "cot-last 3"),
    "seed004": ("--span", "cot-last 3", "--layer-step", "1"),
}
SLOW_ARGS = {
    "seed000": ("--trace-span", "last 2", "--trace-layer-step", "10", "--max-new-tokens", "6"),
    "seed001": ("--span", "cot-last 4", "--layer-step", "10"),
    "seed002": ("--span", "cot-last 2", "--layer-step", "10"),
    "seed004": ("--span", "cot-last 3", "--layer-step", "29"),
}


def check_seed000(r: dict, out: Path, n_layers: int) -> None:
    for f in ("restoration.png", "lens_answer_digit.png", "lens_next_token.png", "neuron_teacher_forced.png",
              "neuron_generation.png"):
        assert (out / f).is_file(), f
    assert {"restoration", "logit_lens", "mlp_ablation", "neuron", "runtime_seconds"} <= set(r)
    assert r["restoration"]["axes"] == ["layer", "position"]
    assert len(r["logit_lens"]["p_answer_digit"]["labels"]["layer"]) == n_layers + 1
    p = torch.tensor(r["logit_lens"]["p_next_token"]["values"])
    assert bool(((p >= 0) & (p <= 1)).all())
    abl = r["mlp_ablation"]["per_problem"][0]
    assert math.isclose(abl["delta"], abl["logp_ablated"] - abl["logp"], abs_tol=1e-5)


def check_seed001(r: dict, out: Path, n_layers: int, latent: bool = False) -> None:
    assert (out / "metrics_by_layer.png").is_file() and (out / "kl_pairs_x_layers.png").is_file()
    if not latent:  # the results of a run without --latent-steps read as they did before the option
        assert not {"latent_steps", "feedback", "read_from"} & set(r["args"])
    assert {"aggregate", "pairs", "sanity_checks", "top5_layers_by_kl"} <= set(r)
    checks = r["sanity_checks"]
    assert checks["self_patch_max_kl"] < 1e-5 and not checks["self_patch_any_top1_change"]
    assert checks["kl_nonnegative"] and checks["from_first_diff_equals_clean"]
    assert set(r["aggregate"]) == {"kl", "l2", "top1_changed"}
    assert len(r["aggregate"]["kl"]["mean"]) == len(r["layers"])


def check_seed002(r: dict, out: Path, n_layers: int) -> None:
    for k in ("kl", "l2", "top1_changed", "logit_diff", "recovery"):
        assert (out / f"mean_{k}.png").is_file()
        assert len(r["mean"][k]) == len(r["layers"])
    assert (out / "attribution_vs_exact.png").is_file() and (out / "pair1_recovery.png").is_file()
    assert {"top5_by_kl", "attribution_corr_pooled", "patched_forwards_per_s"} <= set(r)
    assert -1 <= r["attribution_corr_pooled"] <= 1
    assert min(min(row) for row in r["mean"]["kl"]) >= -1e-6


def check_seed004(r: dict, out: Path, n_layers: int) -> None:
    assert (out / "parallel_vs_iterative.png").is_file() and (out / "cosine_fixed.png").is_file()
    assert {"mean", "cosine_mean", "fixed_vs_parallel_max_abs_logit_diff"} <= set(r)
    assert r["fixed_vs_parallel_max_abs_logit_diff"] < 1e-4  # the seed's identity: fixed inputs -> same run
    assert set(r["mean"]) == {"parallel", "fixed", "greedy"}
    cos = torch.tensor(r["cosine_mean"]["fixed"])
    assert cos.shape == (2, len(r["layers"])) and bool((cos.abs() <= 1 + 1e-5).all())


CASES = [(seed000, check_seed000), (seed001, check_seed001), (seed002, check_seed002), (seed004, check_seed004)]


@pytest.mark.parametrize("module,check", CASES, ids=[m.__name__ for m, _ in CASES])
def test_example_on_tiny_model(module, check, tiny, monkeypatch, tmp_path):
    name = module.__name__.split("_")[0]
    r = run(module, tiny, monkeypatch, tmp_path / name, *FAST_ARGS[name])
    check(r, tmp_path / name, tiny.cfg.n_layers)


def check_seed001_latent(r: dict, out: Path, n_layers: int, k: int, feedback: str = "argmax_embedding",
                         read_from: str = "resid_post") -> None:
    check_seed001(r, out, n_layers, latent=True)
    assert (r["args"]["latent_steps"], r["args"]["feedback"], r["args"]["read_from"]) == (k, feedback, read_from)
    for pair in r["pairs"]:
        start, end = pair["latent"]
        assert pair["span"] == [start, end] and end - start == k
        assert pair["n_positions"] > end and pair["first_diff"] < start  # the questions differ, before the thoughts
        assert "<latent:0>" in pair["clean_text"]
    assert "latent positions" in (out / "summary.md").read_text()


@pytest.mark.parametrize("feedback,read_from", [(None, None), ("identity", "ln_final")], ids=["defaults", "identity"])
def test_seed001_patches_latent_positions_on_tiny_model(tiny, monkeypatch, tmp_path, feedback, read_from):
    options = ["--feedback", feedback, "--read-from", read_from] if feedback else []
    r = run(seed001, tiny, monkeypatch, tmp_path / "seed001", "--latent-steps", "3", *options)
    check_seed001_latent(r, tmp_path / "seed001", tiny.cfg.n_layers, 3, *(options[1::2] or ()))


@pytest.mark.parametrize("argv", [["--feedback", "identity"], ["--read-from", "ln_final"], ["--latent-steps", "0"]])
def test_seed001_refuses_latent_options_without_latent_steps(argv, capsys):
    with pytest.raises(SystemExit):
        seed001.parse(argv)
    assert "--latent-steps" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2() -> HookedCoT:
    from hookedcot.embedded import EmbeddedModelError, embedded_model_path

    try:
        embedded_model_path("smollm2-135m-instruct")
    except EmbeddedModelError as err:
        pytest.skip(str(err))
    return HookedCoT.from_pretrained("smollm2-135m-instruct")


@pytest.mark.slow
@pytest.mark.parametrize("module,check", CASES, ids=[m.__name__ for m, _ in CASES])
def test_example_on_smollm2(module, check, smollm2, monkeypatch, tmp_path):
    name = module.__name__.split("_")[0]
    r = run(module, smollm2, monkeypatch, tmp_path / name, *SLOW_ARGS[name])
    check(r, tmp_path / name, smollm2.cfg.n_layers)


@pytest.mark.slow
def test_seed001_latent_steps_on_smollm2(smollm2, monkeypatch, tmp_path):
    r = run(seed001, smollm2, monkeypatch, tmp_path / "seed001", "--latent-steps", "3", "--layer-step", "10")
    check_seed001_latent(r, tmp_path / "seed001", smollm2.cfg.n_layers, 3)


SEED003_ARGS = ("--n-problems", "4", "--max-new-tokens", "8", "--n-store", "16", "--d-latent", "64", "--steps", "20",
                "--batch-size", "64", "--child-steps", "3", "--min-relative-norm", "0", "--top-features", "3")


def test_seed003_runs_the_whole_diffing_pipeline_on_tiny_model(tiny, monkeypatch, tmp_path):
    import seed003_crosscoder_diffing as seed003

    monkeypatch.setattr(_common, "load_model", lambda args: tiny)
    out = tmp_path / "seed003"
    r = seed003.main(["--out", str(out), "--cache-dir", str(tmp_path / "children"), *SEED003_ARGS])
    assert json.loads((out / "results.json").read_text()).keys() == r.keys()
    for f in ("summary.md", "crosscoder_loss.png", "relative_norms.png", "accuracy.png", "feature_stats.json",
              "crosscoder/crosscoder.safetensors", "crosscoder/config.json"):
        assert (out / f).is_file(), f
    assert len(list(out.glob("store_*/store.json"))) == 1 and list(out.glob("crosscoder_checkpoints_*/step_*.pt"))
    names = [a["name"] for a in r["accuracy"]]
    assert names == ["base", "child", "base ← child, chosen features", "base ← child, every latent (control)",
                     "child, features zeroed",
                     "child, features ×1.5", "child, features ×0.5"]
    assert all(a["n"] == 4 and 0 <= a["ci95"][0] <= a["accuracy"] <= a["ci95"][1] <= 1 for a in r["accuracy"])
    assert len(r["features"]) == 3 and r["store"]["tokens"] > 0 and set(r["crosscoder"]["fve"]) == {"base", "child"}
    assert "| child, features ×0.5 |" in (out / "summary.md").read_text()
    again = seed003.main(["--out", str(tmp_path / "again"), "--cache-dir", str(tmp_path / "children"), *SEED003_ARGS])
    assert again["child"]["from_cache"] and again["accuracy"] == r["accuracy"]  # the child is reused, the run repeats


def test_tuned_lens_example_on_tiny_model(tiny, monkeypatch, tmp_path):
    import tuned_lens

    monkeypatch.setattr(_common, "load_model", lambda args: tiny)
    out = tmp_path / "tuned"
    r = tuned_lens.main(["--out", str(out), "--n-prompts", "4", "--held-out", "1", "--max-new-tokens", "6", "--steps", "5"])
    assert len(r["kl_per_layer"]["tuned"]) == len(r["kl_per_layer"]["logit"]) == tiny.cfg.n_layers
    assert (out / "kl_per_layer.png").is_file() and (out / "lens" / "params.pt").is_file()
    assert list((out / "tuned").glob("*.png")) and list((out / "logit").glob("*.png"))
    assert "| mean |" in (out / "summary.md").read_text()
