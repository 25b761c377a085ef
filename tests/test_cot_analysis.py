"""analyze_cot end to end on the embedded model: the per-step table, save/load, figures, the page,
the CLI command and the example; a saved-and-loaded CoT analyses identically."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from hookedcot.cli import main as cli_main
from hookedcot.cot import CoT
from hookedcot.cot.analysis import CoTAnalysis, analyze_cot

PROMPT = "Q: Tom has 3 apples and buys 2 more. How many apples does he have?\nA:"
COMPLETION = (" Tom starts with 3 apples. He buys 2 more apples at the shop. So now he has 3 + 2 apples. "
              "That makes 5 apples in total. The answer is 5.")
SMALL = dict(n_rollouts=2, max_new_tokens=6, seed=3, progress=False, proximity=1, top_k_heads=4)  # 5 steps: k = 1


@pytest.fixture(scope="module")
def cot(smol_model):
    return CoT.from_text(smol_model, PROMPT, COMPLETION, think=None, correct_answer="5")


@pytest.fixture(scope="module")
def analysis(smol_model, cot):
    return analyze_cot(smol_model, cot, **SMALL)


def test_one_row_per_step_with_every_measure(analysis, cot):
    rows = analysis.rows()
    assert [r["text"] for r in rows] == cot.step_texts
    assert [(r["token_start"], r["token_end"]) for r in rows] == [s.tokens for s in cot.steps]
    for name in ("resampling", "counterfactual", "forced"):
        assert len(analysis.measure(name)) == cot.n_steps
    assert all(v is not None and v >= 0 for v in analysis.measure("resampling"))
    assert analysis.measure("forced") == pytest.approx(analysis.forced.importance)
    frame = analysis.to_pandas()
    assert list(frame.index) == list(range(cot.n_steps)) and "vertical" in frame.columns
    heads = analysis.receiver_heads()
    assert heads and all(0 <= l < 30 and 0 <= h < 9 for l, h, _ in heads)
    assert sorted((k for _, _, k in heads), reverse=True) == [k for _, _, k in heads]
    assert set(analysis.seconds) >= {"resampling", "forced", "attention", "suppression"}


def test_a_saved_and_loaded_cot_analyses_identically(smol_model, cot, analysis, tmp_path):
    again = analyze_cot(smol_model, CoT.load(cot.save(tmp_path / "cot.json")), **SMALL)
    assert json.dumps(again.rows()) == json.dumps(analysis.rows())


def test_save_load_plot_and_page(analysis, tmp_path):
    paths = analysis.write(tmp_path / "out")
    assert all(Path(p).exists() for p in paths)
    assert {p.name for p in map(Path, paths)} >= {"cot.json", "analysis.json", "steps.csv", "cot.html",
                                                   "importance_by_step.png", "step_attention.png", "suppression.png"}
    loaded = CoTAnalysis.load(tmp_path / "out")
    assert json.dumps(loaded.rows()) == json.dumps(analysis.rows())
    page = (tmp_path / "out" / "cot.html").read_text()
    assert page.count('class="step"') == analysis.cot.n_steps and "http://" not in page and "https://" not in page
    data = analysis.page_data()
    assert len(data["steps"]) == analysis.cot.n_steps and set(data["measures"]) >= {"resampling", "forced", "vertical"}
    assert "| step |" in analysis.summary()


def test_unknown_measures_are_refused(smol_model, cot):
    with pytest.raises(ValueError, match="unknown measure"):
        analyze_cot(smol_model, cot, measures=["resampling", "vibes"])


def test_only_the_chosen_measures_run(smol_model, cot):
    forced_only = analyze_cot(smol_model, cot, measures=["forced"], progress=False)
    assert forced_only.resampling is None and forced_only.attention is None and forced_only.suppression is None
    assert all(v is None for v in forced_only.measure("resampling"))
    assert all(math.isfinite(v) for v in forced_only.measure("forced"))


def test_cli_cot_command_writes_the_table_figures_and_page(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["cot", "--prompt", "What is 3 + 2?", "--n-rollouts", "2", "--max-new-tokens", "4",
                     "--max-trace-tokens", "24", "--no-think", "--correct-answer", "5", "--out", str(out)]) == 0
    assert (out / "cot.html").exists() and (out / "analysis.json").exists() and (out / "rollouts").is_dir()
    assert "| step |" in capsys.readouterr().out


def test_the_example_writes_results_summary_and_figures(smol_model, tmp_path, monkeypatch):
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    import _common
    import cot_anchors

    monkeypatch.setattr(_common, "load_model", lambda args: smol_model)
    out = tmp_path / "ex"
    results = cot_anchors.main(["--out", str(out), "--n-rollouts", "2", "--max-new-tokens", "4", "--max-trace-tokens", "40"])
    assert (out / "summary.md").read_text().startswith("# cot_anchors")
    assert json.loads((out / "results.json").read_text())["n_steps"] == results["n_steps"] > 0
    assert (out / "cot.html").exists() and (out / "importance_by_step.png").exists()
    sys.modules.pop("cot_anchors", None)


def test_a_saved_analysis_without_an_answer_to_force_loads(smol_model, tmp_path):
    cot = CoT.from_text(smol_model, PROMPT, " Tom has some apples. He buys a few more of them.", think=None)
    result = analyze_cot(smol_model, cot, measures=["forced", "attention"], progress=False, proximity=1)
    assert result.forced.answer is None and all(math.isnan(x) for x in result.forced.logprob)
    loaded = CoTAnalysis.load(result.save(tmp_path / "none"))
    assert json.dumps(loaded.rows()) == json.dumps(result.rows()) and loaded.summary()


def test_latent_traces_get_a_clear_error_for_token_only_measures(smol_model, cot):
    import copy as copy_

    latent = copy_.copy(cot)
    latent.embeds = smol_model.embed(__import__("torch").tensor([cot.tokens]))
    with pytest.raises(ValueError, match="measures=\\('attention', 'suppression'\\)"):
        analyze_cot(smol_model, latent)
    assert analyze_cot(smol_model, latent, measures=["attention"], proximity=1).attention is not None
