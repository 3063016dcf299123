#!/usr/bin/env bash
# README command 1, the main job: install (into .venv), then fine-tune the embedded SmolLM2-135M-Instruct with
# LoRA on examples/data (free-text orders -> a fixed JSON schema) and show the held-out before/after table,
# the adapter size and samples. The run (adapter, checkpoints, metrics.jsonl, loss.png) goes to runs/orders/.
# Extra arguments are passed to `lorakit train` (e.g. --max-steps 20 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lorakit train --config examples/json_extraction.yaml --output-dir runs/orders --overwrite "$@"
