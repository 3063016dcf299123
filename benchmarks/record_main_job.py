"""Run the main job (README command 1) and record what it reached: the README's main-job table and timings.

Runs ``bash scripts/main_job.sh`` (install into .venv, then ``lorakit train --config
examples/json_extraction.yaml --output-dir runs/orders``), times the whole command, and copies the run's own
summary (``runs/orders/eval_results.json``, written by ``lorakit train``), its throughput (tokens seen / training
seconds, from the last checkpoint's ``trainer_state.json``) and whether the venv and the model cache existed
before the command into ``benchmarks/results/main_job.json`` with the machine, date and commit.

Run: python benchmarks/record_main_job.py [--out benchmarks/results/main_job.json] [-- extra lorakit train flags]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import ROOT, finish, provenance, write_results  # noqa: E402 - a sibling module

RUN_DIR = ROOT / "runs" / "orders"


def _model_cache_filled() -> bool:
    home = Path(os.environ.get("LORAKIT_HOME", Path.home() / ".cache" / "lorakit"))
    return home.is_dir() and any(home.rglob("*.safetensors"))


def _last_checkpoint_state(run_dir: Path) -> dict:
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text()) if states else {}


def record(extra: list[str], log_path: Path) -> dict:
    """Run the main job once; return the results dict (without provenance)."""
    before = {"venv_existed": (ROOT / ".venv" / "bin" / "python").exists(), "model_cache_filled": _model_cache_filled()}
    cmd = ["bash", "scripts/main_job.sh", *extra]
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"main job failed (exit {proc.returncode}); see {log_path}")
    summary = json.loads((RUN_DIR / "eval_results.json").read_text())
    state = _last_checkpoint_state(RUN_DIR)
    config = json.loads((RUN_DIR / "run.json").read_text())
    tokens, seconds = state.get("tokens_seen"), state.get("train_seconds")
    return {
        "main_job_command": cmd,
        "state_before": before,
        "whole_command_seconds": round(wall, 1),
        "train_seconds": summary["train_seconds"],
        "steps": summary["steps"],
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if tokens and seconds else None,
        "before": summary["before"],
        "after": summary["after"],
        "adapter_bytes": summary["adapter_bytes"],
        "trainable_params": summary["trainable_params"],
        "samples": summary["samples"],
        "run_config": config,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "main_job.json"))
    p.add_argument("--log", default=str(ROOT / "runs" / "main_job.log"), help="the main job's console output")
    p.add_argument("extra", nargs="*", help="extra flags for lorakit train (after --)")
    args = p.parse_args()
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    results = {"provenance": prov, **record(args.extra, Path(args.log))}
    finish(prov)
    write_results(args.out, results)
    b, a = results["before"], results["after"]
    print(
        f"exact match {b.get('exact_match')} -> {a.get('exact_match')}; eval loss {b.get('eval_loss')} -> "
        f"{a.get('eval_loss')}; train {results['train_seconds']} s, whole command {results['whole_command_seconds']} s"
        f"\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()
