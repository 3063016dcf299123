"""A short real torchrun run of the main job: the README's multi-process figures (time per step, eval loss).

Runs ``torchrun --standalone --nproc-per-node 2 -m lorakit train --config examples/json_extraction.yaml
--max-steps 4 --num-threads 1 --no-eval-generate --output-dir runs/orders-ddp --overwrite`` (2 gloo processes
on CPU, each with the config's batch 8, so a global batch of 16) and records the run's own summary
(``eval_results.json``) and throughput (last checkpoint's ``trainer_state.json``) with the machine, date and
commit. Generation eval is off to keep the run short; the eval loss is computed on every process's share of the
held-out set and gathered.

Run: python benchmarks/record_torchrun.py [--steps 4] [--out benchmarks/results/torchrun.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import ROOT, finish, provenance, write_results  # noqa: E402 - a sibling module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "torchrun.json"))
    args = p.parse_args()
    run_dir = ROOT / "runs" / "orders-ddp"
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        str(args.nproc),
        "-m",
        "lorakit",
        "train",
        "--config",
        "examples/json_extraction.yaml",
        "--max-steps",
        str(args.steps),
        "--num-threads",
        "1",
        "--no-eval-generate",
        "--no-progress",
        "--output-dir",
        str(run_dir.relative_to(ROOT)),
        "--overwrite",
    ]
    prov = provenance()
    start = time.perf_counter()
    launcher = Path(sys.executable).with_name("torchrun")  # this venv's launcher, activated or not
    run_cmd = [str(launcher) if launcher.exists() else "torchrun", *cmd[1:]]
    proc = subprocess.run(run_cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "eval_results.json").read_text())
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda q: int(q.parent.name.split("-")[1]))
    state = json.loads(states[-1].read_text())
    results = {
        "provenance": finish(prov),
        "torchrun_command": cmd,
        "processes": state["world_size"],
        "whole_command_seconds": round(wall, 1),
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "seconds_per_step": round(state["train_seconds"] / state["step"], 2),
        "tokens_seen": state["tokens_seen"],
        "tokens_per_s": round(state["tokens_seen"] / state["train_seconds"], 1),
        "before": summary["before"],
        "after": summary["after"],
    }
    write_results(args.out, results)
    print(
        f"{results['processes']} processes, {results['seconds_per_step']} s/step, {results['tokens_per_s']} tokens/s; "
        f"eval loss {summary['before'].get('eval_loss')} -> {summary['after'].get('eval_loss')}\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()
