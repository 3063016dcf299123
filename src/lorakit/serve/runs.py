"""Training runs on disk, read for the web page: a folder of runs, each run's config, metrics and eval numbers.

A run is a folder that `lorakit train` wrote: ``run.json`` (the config that defines the run), ``metrics.jsonl``
(one JSON record per logged step, appended while it trains), ``eval_before.json`` (the base model's eval) and, once
finished, ``eval_results.json`` (before / after). A sweep's folder holds one such run per config, so runs are found
up to two levels down (``sweep/r8-a16-attention``). Nothing here writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

RUN_MARKERS = ("run.json", "metrics.jsonl")
MAX_DEPTH = 2
MAX_RECORDS = 5000  # records per metrics request: a long run arrives in a few pages


@dataclass(frozen=True)
class MetricsPage:
    """Records of ``metrics.jsonl`` from a byte offset on; ``offset`` is where the next read starts."""

    records: list[dict[str, Any]]
    offset: int
    size: int


def find_runs(root: str | Path) -> dict[str, Path]:
    """Every run folder under ``root`` (itself included), by its path relative to ``root`` ("." for root itself).

    Raises:
        ConfigError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"runs folder {str(root)!r} is not a folder; give the folder your runs were written to")
    found: dict[str, Path] = {}

    def walk(folder: Path, depth: int) -> None:
        if any((folder / m).is_file() for m in RUN_MARKERS):
            found[folder.relative_to(root).as_posix() or "."] = folder
        if depth >= MAX_DEPTH:
            return
        try:
            subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "checkpoint-")))
        except OSError:
            return
        for sub in subs:
            walk(sub, depth + 1)

    walk(root, 0)
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_summary(name: str, folder: Path) -> dict[str, Any]:
    """What the page shows about one run besides its curves: config, eval tables, status."""
    results = _read_json(folder / "eval_results.json")
    before = _read_json(folder / "eval_before.json")
    metrics = folder / "metrics.jsonl"
    if isinstance(results, dict):
        status = "finished"
        before = results.get("before", before)
    elif metrics.is_file():
        status = "training or stopped (no eval_results.json yet)"
    else:
        status = "not started (no metrics.jsonl yet)"
    after = results.get("after") if isinstance(results, dict) else None
    return {
        "name": name,
        "status": status,
        "config": _read_json(folder / "run.json") or {},
        "eval_before": _clean(before) if isinstance(before, dict) else None,
        "eval_after": _clean(after) if isinstance(after, dict) else None,
        "steps": results.get("steps") if isinstance(results, dict) else None,
        "train_seconds": results.get("train_seconds") if isinstance(results, dict) else None,
        "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
    }


def _clean(table: dict[str, Any]) -> dict[str, Any]:
    """Scalar entries only (the sample predictions stay on disk)."""
    return {k: v for k, v in table.items() if isinstance(v, (int, float, str)) or v is None}


def read_metrics(path: Path, offset: int = 0, limit: int = MAX_RECORDS) -> MetricsPage:
    """Complete lines of ``metrics.jsonl`` from byte ``offset``; a half-written last line waits for the next read.

    Non-finite numbers (a NaN loss) become None, so the answer is strict JSON; lines that are not JSON objects
    are skipped.
    """
    if offset < 0:
        raise ConfigError(f"offset must be >= 0, got {offset}")
    try:
        size = path.stat().st_size
    except OSError:
        return MetricsPage([], 0, 0)
    if offset > size:  # the file was replaced (--overwrite): start again
        offset = 0
    records: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        f.seek(offset)
        while len(records) < limit:
            line = f.readline()
            if not line.endswith(b"\n"):
                break
            offset += len(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append({k: _finite(v) for k, v in record.items()})
    return MetricsPage(records, offset, size)


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
