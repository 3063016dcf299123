"""The loss curve of a run (``metrics.jsonl`` -> PNG), with matplotlib's non-interactive backend."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from lorakit.io.checkpoint import atomic_write_bytes

logger = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Write train (and eval) loss against step to ``out_path``; None when there is nothing to plot.

    A resumed run's records are deduplicated by step (the latest record wins).
    """
    records = read_metrics(metrics_path)
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping the loss plot (pip install 'lorakit[hf]').")
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
    out = Path(out_path)
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
    return out
