"""`hookedcot demo | lens | patch` on the embedded real model, at the smallest sizes."""

from __future__ import annotations

import json

from hookedcot.cli import main


def test_demo_writes_its_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "6", "--patch-positions", "2", "--n-pairs", "4"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["question"] and summary["completion"] and summary["final_layer_ranks_written_tokens_first"]
    for name in ("lens_answer.png", "lens_next_token_prob.json", "patching.png", "patch_resid_pre_layer_position.json"):
        assert (out / name).stat().st_size > 100, name
    assert "patched forwards/s" in capsys.readouterr().out


def test_lens_and_patch_commands(tmp_path):
    assert main(["lens", "--prompt", "Q: What is 2+2?\nA:", "--target", "4", "--out", str(tmp_path / "lens")]) == 0
    assert (tmp_path / "lens" / "lens_prob.json").exists() and (tmp_path / "lens" / "lens_top_k.json").exists()
    assert main(["patch", "--clean", "Q: 12 + 3 =", "--corrupted", "Q: 13 + 3 =", "--positions", "last 2",
                 "--out", str(tmp_path / "patch")]) == 0
    result = json.loads((tmp_path / "patch" / "pair0_patch_resid_pre_layer_position.json").read_text())
    assert result["axes"] == ["layer", "position"] and len(result["values"]) == 30
    assert main(["patch", "--out", str(tmp_path / "p2")]) == 2  # nothing to patch: usage error
