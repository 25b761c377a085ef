"""The benchmark suite runs end to end at its tiniest size, hookedcot alone (no peers), on a tiny
random checkpoint: every question returns rows and budgets of the documented shape and the runner
writes results.md and results.json. Structure only: no timing is asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import BENCHMARKS, main

ROW_KEYS = {
    "forward": {"model", "batch", "pos", "tool", "case", "time_s", "x_own_plain", "x_hf_plain"},
    "generate": {"model", "tool", "case", "new_tokens", "time_s", "tokens_per_s", "x_hf_generate"},
    "patching_sweep": {"model", "tool", "label", "sites", "grid_s", "sites_per_s", "sweep_speedup"},
    "loading": {"model", "tool", "load_time_s", "peak_rss_MiB", "load_x_weights", "peak_x_weights"},
    "roofline": {"model", "tool", "time_s", "gflops", "fraction_of_peak"},
}


@pytest.fixture(scope="module")
def suite(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = main(["--tiny", "--peers", "none", "--threads", "1", "--models", str(tiny_checkpoints["smollm2_like"]),
                    "--out", str(out), "--cache-dir", str(out / "cache")])
    return out, {r["benchmark"]: r for r in results}


def test_runner_writes_table_and_json(suite):
    out, results = suite
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
    _, results = suite
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
    _, results = suite
    cases = {row["case"] for row in results["forward"]["rows"]}
    assert cases == {"plain", "noop_hook_every_layer", "cache_resid_post", "cache_all"}
