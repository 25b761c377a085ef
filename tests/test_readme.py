"""The README's hook table is the one generated from hookedcot/hook_names.py, and its two
commands are the ones .ci/run runs."""

from pathlib import Path

from hookedcot.hook_names import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_hook_table_matches_the_hook_definitions():
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- hook-table:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- hook-table:end -->")
    assert text[start:end].strip() == markdown_table().strip()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```")[0].strip() for b in text.split("```bash")[1:3]]
    assert blocks[0] == "bash scripts/setup.sh && .venv/bin/hookedcot demo"
    assert blocks[1] == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert blocks[1] in (ROOT / ".ci" / "run").read_text()
