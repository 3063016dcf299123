"""``lorakit sweep``: the honest answer to "which r, alpha and targets?" is a sweep against an eval.

Trains the same data over a grid of rank, alpha and target sets with the ordinary training code
(`run_training`, one subprocess per config so that each config's peak memory is its own), then writes one
table (``sweep.md`` / ``sweep.json``) and one plot (``sweep.png``: eval metric against trainable parameters),
and marks the best config and the cheapest config within ``tolerance`` of it.

Configs run one after another. Training several adapters at once through per-row routing (one copy of the
base) is possible with `lorakit.route` + `lorakit.set_trainable`, but on a CPU it costs the same compute as
running them in turn, so the sweep does not do it.
"""

from __future__ import annotations

import itertools
import json
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.config import default_alpha
from lorakit.errors import ConfigError
from lorakit.training.train_config import TrainConfig, build_config

# "default": target_modules=None, PEFT's default for the architecture (lorakit.default_targets, the one source);
# "attention": all four attention projections of Llama-style models, named explicitly.
TARGET_SETS = {"default": None, "attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear"}
HIGHER_IS_BETTER = {"exact_match": True, "normalized_match": True, "eval_loss": False}


@dataclass
class SweepResult:
    """Every config's numbers, the best one, and the cheapest one within tolerance of the best."""

    rows: list[dict[str, Any]]
    metric: str
    best: str
    cheapest: str
    output_dir: Path
    files: list[Path] = field(default_factory=list)


# LoRA variants a sweep can compare (``--variants``): name -> TrainConfig fields.
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "lora+": {"loraplus_lr_ratio": 16.0},
}


def grid(
    ranks: list[int], alphas: list[float] | None, targets: list[str], variants: list[str] = ("lora",)
) -> list[dict[str, Any]]:
    """The configs of the sweep: every (r, alpha, targets, variant); ``alphas=None`` means alpha = 2r."""
    unknown = [t for t in targets if t not in TARGET_SETS] + [v for v in variants if v not in VARIANTS]
    if unknown or not ranks or not targets or not variants:
        raise ConfigError(
            f"sweep needs ranks, target sets from {sorted(TARGET_SETS)} and variants from {sorted(VARIANTS)}; "
            f"got r={ranks}, targets={targets}, variants={list(variants)}"
        )
    out = []
    for r, alpha, t, v in itertools.product(ranks, alphas or [None], targets, variants):
        alpha = default_alpha(r) if alpha is None else alpha
        name = f"r{r}-a{alpha:g}-{t}" + ("" if list(variants) == ["lora"] else f"-{v}")
        out.append({"name": name, "r": r, "lora_alpha": alpha, "targets": t, "variant": v})
    return out


def run_sweep(
    base: TrainConfig | dict | str,
    output_dir: str | Path,
    ranks: list[int] = (8, 16, 32),
    alphas: list[float] | None = None,
    targets: list[str] = ("default", "all-linear"),
    metric: str | None = None,
    tolerance: float = 0.01,
    variants: list[str] = ("lora",),
) -> SweepResult:
    """Train every config of the grid on ``base``'s data and compare them.

    Args:
        base: The training config every run starts from (a `TrainConfig`, dict or YAML path).
        output_dir: Gets one run folder per config plus ``sweep.md``, ``sweep.json`` and ``sweep.png``.
        ranks: Values of r.
        alphas: Values of lora_alpha (None: 2r for each r).
        targets: Names from ``TARGET_SETS``.
        variants: Names from ``VARIANTS`` (LoRA, rsLoRA, DoRA, PiSSA, OLoRA, LoRA+), each run on every config.
        metric: "exact_match" (default when generation eval is on), "normalized_match" or "eval_loss".
        tolerance: "Within one point": 0.01 for match rates, relative 1% for eval loss.
    """
    cfg = (
        base
        if isinstance(base, TrainConfig)
        else build_config(base if isinstance(base, str) else None, **(base if isinstance(base, dict) else {}))
    )
    metric = metric or ("exact_match" if cfg.eval_generate else "eval_loss")
    if metric not in HIGHER_IS_BETTER:
        raise ConfigError(f"metric={metric!r}; expected one of {sorted(HIGHER_IS_BETTER)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in grid(list(ranks), list(alphas) if alphas else None, list(targets), list(variants)):
        run = {
            **cfg.to_dict(),
            **VARIANTS[spec["variant"]],
            "r": spec["r"],
            "lora_alpha": spec["lora_alpha"],
            "target_modules": TARGET_SETS[spec["targets"]],
            "output_dir": str(out / spec["name"]),
            "overwrite": True,
            "resume": False,
        }
        rows.append({**spec, **_run_child(run)})
        print(f"sweep: {spec['name']}: {metric}={rows[-1].get(metric)}", file=sys.stderr, flush=True)
    best, cheapest = pick(rows, metric, tolerance)
    result = SweepResult(rows, metric, best, cheapest, out)
    result.files = write_report(result)
    return result


def _run_child(run: dict[str, Any]) -> dict[str, Any]:
    """Train one config in a subprocess; returns its eval numbers, size, time and peak RSS."""
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.training.grid", json.dumps(run)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"sweep run {run['output_dir']} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pick(rows: list[dict[str, Any]], metric: str, tolerance: float) -> tuple[str, str]:
    """``(best, cheapest within tolerance of best)`` by ``metric``, cheapness = trainable parameters."""
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        raise ConfigError(f"no run reported {metric}; is there an eval set (and completions for match metrics)?")
    higher = HIGHER_IS_BETTER[metric]
    best = max(scored, key=lambda r: r[metric]) if higher else min(scored, key=lambda r: r[metric])
    if higher:
        ok = [r for r in scored if r[metric] >= best[metric] - tolerance]
    else:
        ok = [r for r in scored if r[metric] <= best[metric] * (1 + tolerance)]
    return best["name"], min(ok, key=lambda r: r["trainable_params"])["name"]


def write_report(result: SweepResult) -> list[Path]:
    """``sweep.json``, ``sweep.md`` (a Markdown table) and ``sweep.png``; returns their paths."""
    from lorakit.io.atomic import atomic_write_bytes

    out = result.output_dir
    atomic_write_bytes(
        out / "sweep.json",
        json.dumps(
            {
                "metric": result.metric,
                "best": result.best,
                "cheapest_within_tolerance": result.cheapest,
                "runs": result.rows,
            },
            indent=2,
        ).encode(),
    )
    head = "| config | trainable params | adapter MB | peak RSS GiB | train s | eval loss | exact match | note |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        marks = (("best", r["name"] == result.best), ("cheapest within tolerance", r["name"] == result.cheapest))
        note = " ".join(n for n, hit in marks if hit)
        em = "-" if r.get("exact_match") is None else f"{r['exact_match']:.1%}"
        loss = "-" if r.get("eval_loss") is None else f"{r['eval_loss']:.4f}"
        lines.append(
            f"| {r['name']} | {r['trainable_params']:,d} | {r['adapter_bytes'] / 1e6:.2f} | "
            f"{r['peak_rss_gib']:.2f} | {r['train_seconds']:.0f} | {loss} | {em} | {note} |"
        )
    atomic_write_bytes(out / "sweep.md", ("\n".join(lines) + "\n").encode())
    from lorakit.plots import sweep_png

    return [out / "sweep.json", out / "sweep.md", sweep_png(result, out / "sweep.png")]


def _child(run_json: str) -> None:
    from lorakit.training.run import run_training

    result = run_training(json.loads(run_json))
    after = result.after
    print(
        json.dumps(
            {
                "status": result.status,
                "trainable_params": result.trainable_params,
                "adapter_bytes": result.adapter_bytes,
                "train_seconds": result.train_seconds,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                **{k: after.get(k) for k in HIGHER_IS_BETTER},
            }
        )
    )


if __name__ == "__main__":
    _child(sys.argv[1])
