#!/usr/bin/env bash
# The GPU pass of the suite, as run on a lent GPU machine (no network there): bf16, every model
# at full size, SmolLM2 as its random-weight twin (the 98 MB GGUF does not travel).
#   [ONLY=forward,...] [PEERS=hf_sdpa,...] bash benchmarks/gpu.sh [OUT_DIR]
# Peers, if wanted, travel as wheels in .whl/ (installed to /tmp/site), and a tokenizer for the
# wrappers that need one in .whl/smollm2-tokenizer/ (see benchmarks/README.md).
set -uo pipefail
out=${1:-${OUT:-bench_out}/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
# hookedcot itself installed (editable): conversions/ is importable only as hookedcot.conversions
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || { echo "could not install hookedcot (pip install -e . needs setuptools>=68)"; exit 1; }
[ -d .whl/smollm2-tokenizer ] && export HOOKEDCOT_BENCH_TOKENIZER=$PWD/.whl/smollm2-tokenizer
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
export HOOKEDCOT_BENCH_CACHE=${HOOKEDCOT_BENCH_CACHE:-/tmp/hookedcot-bench}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -m benchmarks --device cuda --dtype bfloat16 \
    --models smollm2-135m-shape,qwen2-0.5b-shape,llama3.2-1b-shape \
    --only "${ONLY:-forward,generate,patching_sweep,roofline,loading}" --peers "${PEERS:-hf_sdpa,hf_eager,tl,bridge,nnsight}" \
    --out "$out" 2>&1 | tee "$out/log.txt"
