"""The PNG of ``lorakit inspect --png``: normalized singular-value spectra of an adapter's per-layer updates.

Up to `MAX_LINES` layers get one line each (``sigma_i / sigma_1`` against ``i``); more layers become a heat-map
(layers x index) of the cumulative energy ``sum_{j<=i} sigma_j^2 / sum_j sigma_j^2``, where a layer that reaches
1 early is low-rank. Written with matplotlib's non-interactive Agg backend, atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.io.checkpoint import atomic_write_bytes
from lorakit.ops import AdapterReport

MAX_LINES = 16


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LorakitError("--png needs matplotlib: pip install 'lorakit[hf]' (or pip install matplotlib)") from exc
    return plt


def _cumulative_energy(values: list[float], width: int) -> list[float]:
    total = sum(v * v for v in values) or 1.0
    out, acc = [], 0.0
    for i in range(width):
        acc += values[i] ** 2 if i < len(values) else 0.0
        out.append(acc / total)
    return out


def write_spectra_png(report: AdapterReport, path: str | os.PathLike) -> Path:
    """Plot ``report``'s spectra to ``path`` (PNG) and return the path."""
    plt = _pyplot()
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
    out = Path(path)
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
    return out
