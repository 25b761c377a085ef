"""Accuracy over a problem set, per intervention, with Wilson intervals."""

from __future__ import annotations

import json

import pytest

from hookedcot.dictionaries.evaluation import accuracy_table, evaluate_accuracy, load_problems, wilson_interval

PROBLEMS = [("Tom has 3 apples and buys 2 more. How many apples does Tom have?", "5"), ("What is 10 minus 4?", "6")]


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)


def test_batched_accuracy_equals_one_problem_at_a_time_and_an_intervention_counts_separately(smol_model, tmp_path):
    kwargs = dict(max_new_tokens=64, progress=False)
    batched = evaluate_accuracy(smol_model, PROBLEMS, batch_size=2, **kwargs)[0]
    alone = evaluate_accuracy(smol_model, PROBLEMS, batch_size=1, **kwargs)[0]
    assert batched.answers == alone.answers and batched.correct == alone.correct
    assert batched.correct >= 1  # the embedded model solves the demo problem

    def break_it(x, hook):
        return x * 0.0

    broken = evaluate_accuracy(smol_model, PROBLEMS, {"zero layer 20": [("blocks.20.hook_resid_post", break_it)]},
                               batch_size=2, **kwargs)
    assert [r.name for r in broken] == ["zero layer 20"] and broken[0].completions != batched.completions
    table = accuracy_table([batched, *broken])
    assert "| zero layer 20 |" in table and f"| baseline | {batched.correct} / 2 |" in table
    path = tmp_path / "problems.json"
    path.write_text(json.dumps([{"question": q, "answer": a} for q, a in PROBLEMS]))
    assert load_problems(path) == PROBLEMS
    path.write_text(json.dumps([{"q": 1}]))
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        load_problems(path)
