"""Step-count sweep behind the main job's ``max_steps``: held-out exact match for each (steps, seed).

Each run is the main job's own run (``lorakit train --config examples/json_extraction.yaml``) with two settings
changed, ``max_steps`` and ``seed``, in its own process; only the base model's generation eval is left out (the
same for every run; the main job's results file has it). Every run is kept in the results file (no best-of):
per step count the file and the printed table give the median and the range over seeds. The file is written
after every run, and runs already in it are skipped, so an interrupted sweep continues where it stopped and
more seeds can be added later; sweeps run side by side (``--steps 60 --seeds 1`` next to ``--steps 40 --seeds 2``)
add their runs to the same file.

Run: python benchmarks/sweep_steps.py [--steps 40 60 80] [--seeds 1 2] [--out benchmarks/results/sweep_steps.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import ROOT, finish, provenance, spread, write_results  # noqa: E402 - a sibling module

CONFIG = "examples/json_extraction.yaml"


def child(config: str, steps: int, seed: int, run_dir: str) -> dict:
    """In a fresh process: ``lorakit train``'s run with the config's settings but ``steps`` and ``seed``.

    The base model's generation eval (identical in every run, and the slowest part: the base rambles to the
    token limit) is skipped; after training the adapter is scored by the same greedy ``generation_eval``
    that ``lorakit train`` runs, with the config's settings.
    """
    from lorakit.models import load_model
    from lorakit.training import run_training
    from lorakit.training.evaluate import generation_eval
    from lorakit.training.jsonl import read_jsonl
    from lorakit.training.precision import choose_threads, make_autocast
    from lorakit.training.train_config import build_config

    cfg = build_config(config, max_steps=steps, seed=seed, output_dir=run_dir, overwrite=True, progress=False,
                       eval_generate=False)  # fmt: skip
    model, tok = load_model(cfg.model)
    result = run_training(cfg, model=model, tokenizer=tok)
    choose_threads(cfg.num_threads)  # run_training restores the thread count it found; choose again, as it did
    autocast = make_autocast(cfg.precision, next(model.parameters()).device)
    g = generation_eval(model, tok, read_jsonl(cfg.eval_data), cfg.chat_template, cfg.max_new_tokens,
                        cfg.eval_batch_size, autocast)  # fmt: skip
    return {"train_seconds": round(result.train_seconds, 1), "before": {"eval_loss": result.before["eval_loss"]},
            "after": {**g.summary(), "eval_loss": result.after["eval_loss"]}}  # fmt: skip


def train_once(config: str, steps: int, seed: int, run_dir: Path) -> dict:
    """One run in its own process; returns its held-out metrics and timing."""
    cmd = [sys.executable, __file__, "--child", config, str(steps), str(seed), str(run_dir)]
    prov = provenance(cmd)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"steps": steps, "seed": seed, "provenance": finish(prov), "wall_seconds": round(wall, 1), **out}


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per step count: median and range over seeds of exact match, normalized match and eval loss."""
    out: dict[str, dict] = {}
    for steps in sorted({r["steps"] for r in runs}):
        rs = [r for r in runs if r["steps"] == steps]
        out[str(steps)] = {"seeds": [r["seed"] for r in rs]} | {
            key: spread([r["after"][key] for r in rs]) for key in ("exact_match", "normalized_match", "eval_loss")
        }
    return out


def table(summary: dict[str, dict]) -> str:
    lines = [
        "| steps | seeds | exact match, median (range) | normalized match, median (range) | eval loss, median |",
        "|---|---|---|---|---|",
    ]
    for steps, s in summary.items():
        em, nm = s["exact_match"], s["normalized_match"]
        lines.append(
            f"| {steps} | {len(s['seeds'])} | {em['median']:.0%} ({em['min']:.0%}-{em['max']:.0%}) "
            f"| {nm['median']:.0%} ({nm['min']:.0%}-{nm['max']:.0%}) | {s['eval_loss']['median']:.4f} |"
        )
    return "\n".join(lines)


def _record(out: Path, config: str, run: dict) -> list[dict]:
    """Add one run to the results file under a lock, re-reading it first: several sweeps may share one file."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / f"lorakit-{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = json.loads(out.read_text())["runs"] if out.is_file() else []
        runs = [r for r in runs if (r["steps"], r["seed"]) != (run["steps"], run["seed"])] + [run]
        runs.sort(key=lambda r: (r["steps"], r["seed"]))
        write_results(out, {"provenance": provenance(), "config": config, "runs": runs, "summary": summarize(runs)})
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[40, 60, 80])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep_steps.json"))
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "sweep_steps"))
    p.add_argument("--config", default=CONFIG, help="the run's settings (default: the main job's)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])))
        return
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    for seed in args.seeds:  # seed-major: a stopped sweep still has every step count measured
        for steps in args.steps:
            if any(r["steps"] == steps and r["seed"] == seed for r in runs):
                continue
            run = train_once(args.config, steps, seed, Path(args.runs_dir) / f"steps{steps}_seed{seed}")
            print(f"steps {steps} seed {seed}: {run['after']}", flush=True)
            runs = _record(out, args.config, run)
    print(table(summarize(runs)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
