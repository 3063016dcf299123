"""The learning table: what LoRA, rsLoRA, DoRA, PiSSA, OLoRA and LoRA+ buy on CPU-sized jobs (same seeds).

Each run trains SmolLM2-135M-Instruct for ``--steps`` optimizer steps with the main job's settings
(examples/json_extraction.yaml) and keeps the checkpoints at steps 20 / 40 / 80 (``save_steps=20``); after the
run, each checkpoint's adapter is put back into the trained model and scored by greedy-generation exact match on
a fixed held-out subset. So one 80-step run gives the whole learning curve (same cosine schedule as the real
job). Tasks: the main job (JSON extraction from free-text orders) and a second generated task (dates written
out in words -> ISO 8601), both seeded. Results are appended to benchmarks/results/variants.json after every run,
so a partial sweep still reports what it covered; runs from earlier passes are kept (a run with the same task,
variant, seed and steps is replaced), and each pass's provenance (commit, command, machine, load) is listed under
``passes``.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/bench_variants.py --seeds 42 43 --eval-rows 40

The README's tables come from the file: ``python benchmarks/bench_variants.py --table --tasks T --steps N --marks
...`` prints one row per variant, each cell one value per seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit.training.grid import VARIANTS  # the sweep's variant table: one source

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import finish, provenance, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "variants.json"
MONTHS = "January February March April May June July August September October November December".split()


def date_rows(n: int, seed: int) -> list[dict[str, str]]:
    """The second task: a date written one of four ways -> ``YYYY-MM-DD`` (seeded)."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        month = MONTHS[m - 1]
        th = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(d, "th")
        text = rng.choice(
            [f"{month} {d}, {y}", f"{d} {month} {y}", f"the {d}{th} of {month}, {y}", f"{month[:3]}. {d} {y}"]
        )
        rows.append(
            {"prompt": f"Write this date in ISO format (YYYY-MM-DD).\n{text}", "completion": f"{y:04d}-{m:02d}-{d:02d}"}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def tasks(tmp: Path, eval_rows: int) -> dict[str, dict]:
    orders_eval = [json.loads(x) for x in (ROOT / "examples/data/orders_eval.jsonl").read_text().splitlines()]
    write_jsonl(tmp / "orders_eval.jsonl", orders_eval[:eval_rows])
    write_jsonl(tmp / "dates_train.jsonl", date_rows(320, seed=1))
    write_jsonl(tmp / "dates_eval.jsonl", date_rows(eval_rows, seed=2))
    config = str(ROOT / "examples/json_extraction.yaml")
    return {
        "json_extraction": {"config": config, "eval_data": str(tmp / "orders_eval.jsonl")},
        "dates_iso": {"config": config, "data": str(tmp / "dates_train.jsonl"),
                      "eval_data": str(tmp / "dates_eval.jsonl"), "max_length": 96},
    }  # fmt: skip


def score_checkpoints(model, tokenizer, run_dir: Path, steps: list[int], eval_file: str) -> dict[str, float]:
    """Exact match of each checkpoint's adapter on the held-out rows (loaded into the trained model)."""
    from safetensors.torch import load_file

    from lorakit.io.peft_format import from_peft_state
    from lorakit.state import adapter_state_dict, load_adapter_state_dict
    from lorakit.training.evaluate import generation_eval
    from lorakit.training.jsonl import read_jsonl

    rows, out = read_jsonl(eval_file), {}
    expected = list(adapter_state_dict(model, "default"))
    model.eval()
    for step in steps:
        state = load_file(run_dir / f"checkpoint-{step}" / "adapter_model.safetensors")
        load_adapter_state_dict(model, from_peft_state(state, expected, "default", []), "default")
        with torch.no_grad():
            out[str(step)] = generation_eval(model, tokenizer, rows, batch_size=20).exact_match
    return out


def one_run(base, tokenizer, task: dict, variant: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    from lorakit.training.run import run_training

    run_dir = tmp / f"{variant}-{seed}-{time.monotonic_ns()}"
    model = copy.deepcopy(base)
    overrides = {k: v for k, v in task.items() if k != "config"}
    marks = [m for m in args.marks if m <= args.steps]
    result = run_training(task["config"], model=model, tokenizer=tokenizer, output_dir=str(run_dir), seed=seed,
                          max_steps=args.steps, save_steps=min(marks), save_total_limit=100, eval_generate=False,
                          progress=False, batch_size=args.batch_size, **overrides, **VARIANTS[variant])  # fmt: skip
    em = score_checkpoints(model, tokenizer, run_dir, marks, task["eval_data"])
    return {"exact_match": em, "step_seconds": round(result.train_seconds / result.steps, 3),
            "final_loss": result.final_loss, "eval_loss_after": result.after.get("eval_loss")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-rows", type=int, default=40)
    parser.add_argument(
        "--marks", type=int, nargs="+", default=[20, 40, 80], help="steps scored (multiples of the 1st)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (the main job uses 8)")
    parser.add_argument("--tasks", nargs="+", default=["json_extraction", "dates_iso"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument(
        "--table", action="store_true", help="print the README's tables from the results file, run nothing"
    )
    args = parser.parse_args()
    if args.table:
        report = json.loads(OUT.read_text(encoding="utf-8"))
        for task in args.tasks:
            print(table(report["runs"], task, args.steps, args.marks, args.variants))
        return
    from lorakit.models import load_model

    base, tokenizer = load_model("smollm2-135m-instruct")
    prov = provenance()
    prov["threads"] = torch.get_num_threads()
    header = dict(model="smollm2-135m-instruct", batch_size=args.batch_size, eval_rows=args.eval_rows,
                  variants={k: v for k, v in VARIANTS.items() if k in args.variants})  # fmt: skip
    record(header, prov, None)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        all_tasks = tasks(tmp, args.eval_rows)
        for seed in args.seeds:
            for task in args.tasks:
                for variant in args.variants:
                    t0 = time.perf_counter()
                    try:
                        row = one_run(base, tokenizer, all_tasks[task], variant, seed, args, tmp)
                    except Exception as exc:  # e.g. a diverging variant (NaN): record it, keep sweeping
                        row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    row.update(task=task, variant=variant, seed=seed, steps=args.steps, eval_rows=args.eval_rows,
                               batch_size=args.batch_size, wall_seconds=round(time.perf_counter() - t0, 1),
                               commit=prov["commit"])  # fmt: skip
                    print(json.dumps(row), flush=True)
                    record(header, finish(prov), row)


def record(header: dict, prov: dict, row: dict | None) -> None:
    """Merge this pass's header, provenance and ``row`` into the results file (read-modify-write under a lock).

    Passes may run side by side (each process its own variants): each write re-reads the file, so no pass drops
    another's runs. A run with the same task, variant, seed and steps as an earlier one replaces it.
    """
    import fcntl

    with open(OUT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(OUT.read_text(encoding="utf-8")) if OUT.is_file() else {}
        passes = report.setdefault("passes", [])
        report.setdefault("runs", [])
        report.update({k: v for k, v in header.items() if k != "variants"})
        report["variants"] = {**report.get("variants", {}), **header["variants"]}
        report["passes"] = [p for p in passes if p.get("date_utc") != prov["date_utc"] or
                            p.get("command") != prov["command"]] + [prov]  # fmt: skip
        if row is not None:
            same = _key(row)
            report["runs"] = [r for r in report["runs"] if _key(r) != same] + [row]
        write_results(OUT, report)


def table(runs: list[dict], task: str, steps: int, marks: list[int], variants: list[str]) -> str:
    """Markdown: per variant, exact match at each mark per seed (seeds in the header), s/step and eval loss."""
    runs = [r for r in runs if r["task"] == task and r["steps"] == steps and "error" not in r]
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["variant"], r["seed"]): r for r in runs}
    per_seed = " / ".join(str(s) for s in seeds)
    head = [f"| variant ({task}, {steps} steps; seeds {per_seed}) |", *(f" exact match @{m} |" for m in marks),
            " s/step |", " eval loss after |"]  # fmt: skip
    lines = ["".join(head), "|---" * (len(marks) + 3) + "|"]
    for v in variants:
        got = [by.get((v, s)) for s in seeds]
        if not any(got):
            continue

        def cell(fn, got=got) -> str:
            return " / ".join("-" if r is None else fn(r) for r in got)

        ems = [cell(lambda r, m=m: f"{r['exact_match'][str(m)]:.3f}") for m in marks]
        step = cell(lambda r: f"{r['step_seconds']:.1f}")
        loss = cell(lambda r: f"{r['eval_loss_after']:.4f}")
        lines.append(f"| {v} | " + " | ".join(ems) + f" | {step} | {loss} |")
    return "\n".join(lines)


def _key(run: dict) -> tuple:
    return run["task"], run["variant"], run["seed"], run["steps"]


if __name__ == "__main__":
    main()
