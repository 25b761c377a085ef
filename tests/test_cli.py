"""`hookedcot demo | lens | patch` on the embedded real model, at the smallest sizes."""

from __future__ import annotations

import json

from hookedcot.cli import main


def test_demo_answers_correctly_and_finds_where_the_operand_moves(tmp_path, capsys):
    """The embedded model reasons "3 + 2 = 5"; changing its 3 to a 4 makes it continue "6", and
    patching shows the digit's own position carrying it in early layers, the last position later."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "24", "--layer-step", "3"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["final_number"] == summary["expected"] == 5
    assert summary["calculation"] == "3 + 2 =" and (summary["clean_next"], summary["corrupted_next"]) == ("5", "6")
    assert "carries it up to layer" in summary["patching"]
    recovery = json.loads((out / "patch_resid_pre_recovery.json").read_text())
    values = recovery["values"]  # [layer, position]: 1 = the clean answer is back
    changed = recovery["labels"]["position"].index("64 '3'->'4'")
    assert values[0][changed] > 0.9 and values[-1][-1] > 0.9 and abs(values[0][-1]) < 0.1
    for name in ("lens_answer.png", "lens_next_token_prob.json", "patching.png"):
        assert (out / name).stat().st_size > 100, name
    assert "final number: 5 (expected 5: correct)" in capsys.readouterr().out


def test_lens_and_patch_commands(tmp_path):
    assert main(["lens", "--prompt", "Q: What is 2+2?\nA:", "--target", "4", "--out", str(tmp_path / "lens")]) == 0
    assert (tmp_path / "lens" / "lens_prob.json").exists() and (tmp_path / "lens" / "lens_top_k.json").exists()
    assert main(["patch", "--clean", "Q: 12 + 3 =", "--corrupted", "Q: 13 + 3 =", "--positions", "last 2",
                 "--out", str(tmp_path / "patch")]) == 0
    result = json.loads((tmp_path / "patch" / "pair0_patch_resid_pre_layer_position.json").read_text())
    assert result["axes"] == ["layer", "position"] and len(result["values"]) == 30
    assert main(["patch", "--out", str(tmp_path / "p2")]) == 2  # nothing to patch: usage error
