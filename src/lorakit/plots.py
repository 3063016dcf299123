"""The PNGs lorakit writes, all with matplotlib's non-interactive Agg backend and written atomically.

- `loss_png`: a run's train (and eval) loss against step, from its ``metrics.jsonl``.
- `spectra_png`: normalized singular-value spectra of an adapter's per-layer updates (``lorakit inspect --png``).
  Up to `MAX_LINES` layers get one line each (``sigma_i / sigma_1`` against ``i``); more layers become a heat-map
  (layers x index) of the cumulative energy ``sum_{j<=i} sigma_j^2 / sum_j sigma_j^2``, where a layer that reaches
  1 early is low-rank.
- `sweep_png`: a sweep's eval metric against trainable parameters.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.io.atomic import atomic_write_bytes
from lorakit.ops import AdapterReport
from lorakit.training.metrics import read_metrics

logger = logging.getLogger(__name__)
MAX_LINES = 16


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; a `LorakitError` naming the extra when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LorakitError("plots need matplotlib: pip install 'lorakit[hf]' (or pip install matplotlib)") from exc
    return plt


def save_png(plt, fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render ``fig`` to PNG bytes, close it, and write them to ``path`` atomically."""
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    out = Path(path)
    atomic_write_bytes(out, png.getvalue())
    return out


def loss_png(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Write train (and eval) loss against step to ``out_path``; None when there is nothing to plot.

    A resumed run's records are deduplicated by step (the latest record wins).
    """
    records = read_metrics(metrics_path)
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    if not train:
        return None
    try:
        plt = pyplot()
    except LorakitError as exc:
        logger.warning("%s; skipping the loss plot", exc)
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps = sorted(train)
    ax.plot(steps, [train[s] for s in steps], label="train loss")
    if evals:
        es = sorted(evals)
        ax.plot(es, [evals[s] for s in es], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per learned token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(plt, fig, out_path)


def _cumulative_energy(values: list[float], width: int) -> list[float]:
    total = sum(v * v for v in values) or 1.0
    out, acc = [], 0.0
    for i in range(width):
        acc += values[i] ** 2 if i < len(values) else 0.0
        out.append(acc / total)
    return out


def spectra_png(report: AdapterReport, path: str | os.PathLike) -> Path:
    """Plot ``report``'s spectra to ``path`` (PNG) and return the path."""
    plt = pyplot()
    layers = [s for s in report.layers if s.singular_values and s.singular_values[0] > 0]
    fig, ax = plt.subplots(figsize=(7, 4.5) if len(layers) <= MAX_LINES else (8, max(4, len(layers) * 0.06)))
    if not layers:
        ax.text(0.5, 0.5, "every update is zero", ha="center", va="center")
    elif len(layers) <= MAX_LINES:
        for s in layers:
            top = s.singular_values[0]
            ax.plot(range(1, len(s.singular_values) + 1), [v / top for v in s.singular_values], "o-", label=s.path)
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("sigma_i / sigma_1")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    else:
        width = max(len(s.singular_values) for s in layers)
        grid = [_cumulative_energy(s.singular_values, width) for s in layers]
        image = ax.imshow(
            grid,
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(0.5, width + 0.5, len(layers) - 0.5, -0.5),
        )
        fig.colorbar(image, ax=ax, label="energy kept by the top i directions")
        ax.set_xlabel("rank i")
        ax.set_ylabel(f"layer ({len(layers)}, in module order)")
    ax.set_title(f"{Path(report.source).name or 'adapter'}: {report.verdict}", fontsize=9)
    fig.tight_layout()
    return save_png(plt, fig, path, dpi=110)


def sweep_png(result, path: str | os.PathLike) -> Path:
    """The sweep's metric against trainable parameters, best and cheapest-within-tolerance circled."""
    from lorakit.training.grid import TARGET_SETS

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for t, marker in zip(TARGET_SETS, "o^s"):
        rs = [r for r in result.rows if r["targets"] == t and r.get(result.metric) is not None]
        ax.plot([r["trainable_params"] for r in rs], [r[result.metric] for r in rs], marker, label=t, ms=8)
        for r in rs:
            ax.annotate(
                f"r{r['r']} a{r['lora_alpha']:g}",
                (r["trainable_params"], r[result.metric]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
    for name, style in ((result.best, "*"), (result.cheapest, "D")):
        r = next(r for r in result.rows if r["name"] == name)
        ax.plot(r["trainable_params"], r[result.metric], style, ms=14, mfc="none", mec="red")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(result.metric)
    ax.set_title(f"best: {result.best}; cheapest within tolerance: {result.cheapest}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(plt, fig, path)
