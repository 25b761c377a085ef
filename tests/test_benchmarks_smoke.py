"""The benchmark suite runs end to end at its tiniest size, hookedcot alone (no peers), on a tiny
random checkpoint: every question returns rows and budgets of the documented shape and the runner
writes results.md and results.json; no model is built in the runner's own process (every tool runs
in a process of its own, so no peer runs under hookedcot's allocator option). The span sweep's
naive loop agrees with the sweep. Structure only: no timing is asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import BENCHMARKS, main

ROW_KEYS = {
    "forward": {"model", "batch", "pos", "tool", "case", "time_s", "x_own_plain", "x_hf_plain"},
    "generate": {"model", "tool", "case", "new_tokens", "time_s", "tokens_per_s", "x_hf_generate"},
    "patching_sweep": {"model", "tool", "label", "sites", "grid_s", "sites_per_s", "sweep_speedup"},
    "loading": {"model", "tool", "load_time_s", "torch_import_s", "import_s", "load_s", "load_again_s", "peak_rss_MiB",
                "load_x_weights", "peak_x_weights"},
    "roofline": {"model", "tool", "time_s", "gflops", "fraction_of_peak"},
    "rollouts": {"model", "tool", "rollouts", "new_tokens", "time_s", "tokens_per_s", "x_hf_generate"},
    "attention_anatomy": {"model", "tool", "case", "pos", "steps", "time_s", "x_plain_logits", "peak_extra_MiB"},
    "activation_store": {"model", "tool", "case", "hook", "tokens", "time_s", "x_plain_logits", "x_plain_no_logits"},
    "steered_generate": {"model", "tool", "case", "batch"},
    "graph_cache": {"model", "tool", "case", "shape"},
}


@pytest.fixture(scope="module")
def suite(tiny_checkpoints, tmp_path_factory):
    from hookedcot import HookedCoT

    out = tmp_path_factory.mktemp("bench")
    built = []
    with pytest.MonkeyPatch.context() as mp:  # the tools' own processes are spawned: this sees the runner only
        mp.setattr(HookedCoT, "__init__", lambda self, *a, **k: built.append(1) or pytest.fail("model built"))
        results = main(["--tiny", "--peers", "none", "--threads", "1", "--models", str(tiny_checkpoints["smollm2_like"]),
                        "--out", str(out), "--cache-dir", str(out / "cache")])
    return out, {r["benchmark"]: r for r in results}, built


def test_runner_writes_table_and_json(suite):
    out, results, _ = suite
    assert set(results) == set(BENCHMARKS)
    table = (out / "results.md").read_text()
    for name in BENCHMARKS:
        assert f"## {name}" in table
    assert "## budgets" in table
    data = json.loads((out / "results.json").read_text())
    assert {"cpu", "cores", "threads", "torch", "date", "versions"} <= set(data["machine"])
    assert [r["benchmark"] for r in data["results"]] == list(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_result_structure(suite, name):
    _, results, _ = suite
    res = results[name]
    assert "error" not in res, res.get("error")
    assert {"benchmark", "rows", "skipped", "notes", "budgets"} <= set(res)
    assert res["rows"], f"{name} produced no rows"
    for row in res["rows"]:
        assert ROW_KEYS[name] <= set(row), f"{name} row lacks {ROW_KEYS[name] - set(row)}"
        if "time_s" in row and isinstance(row["time_s"], dict):
            assert {"median", "min", "max", "n"} <= set(row["time_s"])
    assert all(row["tool"] == "ours" or name in ("roofline",) for row in res["rows"] if name != "patching_sweep")
    for budget in res["budgets"]:
        assert {"budget", "model", "ratio", "limit", "verdict"} <= set(budget)
        assert budget["verdict"] in ("met", "MISSED", "n/a")


def test_forward_covers_every_case(suite):
    _, results, _ = suite
    cases = {row["case"] for row in results["forward"]["rows"]}
    assert cases == {"plain", "noop_hook_every_layer", "cache_resid_post", "cache_all"}


def test_no_model_is_built_in_the_runners_process(suite):
    _, results, built = suite
    assert not built
    assert not any(r.get("error") for r in results.values())


def test_patching_sweep_times_batch_1_and_batched_naive_loops_in_rounds(suite):
    _, results, _ = suite
    rows = results["patching_sweep"]["rows"]
    labels = {row["label"] for row in rows if row["tool"] == "ours"}
    assert {"hookedcot naive loop, batch 1", "hookedcot naive loop, batch 6"} <= labels
    sweep = next(row for row in rows if "batched" in row["label"])
    assert sweep["time_s"]["n"] >= 2
    for row in rows:
        if "naive" in row["label"]:
            assert row["speedup"]["n"] == sweep["time_s"]["n"]
            assert row["max_abs_diff_vs_sweep"] < 1e-4


def test_sweep_span_naive_loop_matches_the_sweep_in_every_placement(tiny_checkpoints):
    import torch

    from benchmarks.sweep_span import measure
    from hookedcot import HookedCoT

    model = HookedCoT.from_pretrained(tiny_checkpoints["smollm2_like"])
    with torch.inference_mode():
        out = measure(model, n_pos=12, span=4, rounds=2, n_sample=3)
    assert out["sites"] == model.cfg.n_layers * 4
    assert out["changed_position"]["before"] < 12 - 4 <= out["changed_position"]["inside"]
    assert all(diff < 1e-4 for diff in out["max_abs_diff_naive_vs_sweep"].values())
    assert [label.split(":")[0] for label in out["speedup"]] == [
        "headline", "variant inside", "variant full logits", "variant old method"]
    assert all(s["n"] == 2 for s in out["speedup"].values())
