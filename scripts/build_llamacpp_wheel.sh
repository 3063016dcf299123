#!/usr/bin/env bash
# Build the llama-cpp-python wheel once (CPU, from PyPI's source release; 10+ minutes on 2 cores) into the cache
# that scripts/setup.sh installs it from ($LORAKIT_WHEELS, default ~/.cache/lorakit/wheels). Then rerun
# scripts/setup.sh (or scripts/test.sh): the llama.cpp tests (tests/export/test_llamacpp.py) and
# benchmarks/check_gguf_export.py run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${LORAKIT_WHEELS:-$HOME/.cache/lorakit/wheels}
mkdir -p "$WHEELS"
PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
"$PY" -m pip wheel --no-deps -w "$WHEELS" "llama-cpp-python>=0.3,<0.4"
