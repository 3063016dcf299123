"""Where training rows come from: JSONL read line by line, everything else through the ``datasets`` library.

``--data`` (and ``--eval-data``) accept:

* a ``.jsonl`` file or a folder of them: read here, line by line, so errors name the line;
* ``.json`` / ``.csv`` / ``.parquet`` / ``.arrow`` files, a folder of them, several comma-separated paths or a
  glob (``data/*.parquet``): each file goes through ``datasets.load_dataset`` (its builder for the extension);
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``datasets.load_from_disk``;
* a hub dataset id (``owner/name``) with a split and an optional config: ``datasets.load_dataset``, which
  honours ``HF_ENDPOINT`` (a mirror) and ``HF_HUB_OFFLINE`` / the local datasets cache.

Anything read through ``datasets`` is an Arrow table on disk, memory-mapped: the rows are validated once in
batches of `SCAN_BATCH` and then read on demand by index (`DatasetRows`); JSONL rows are read on demand from
their byte offsets (`lorakit.training.jsonl`). Tokenized examples go to flat files on disk
(`lorakit.training.token_store`), so a file larger than memory costs a few bytes of Python memory per row.
"""

from __future__ import annotations

import bisect
import glob
import logging
import os
import re
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import DataError
from lorakit.training.data import LazyRows, Row, split_train_eval
from lorakit.training.formats import RowProblem, RowSpec, normalize
from lorakit.training.jsonl import read_jsonl

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SCAN_BATCH = 1000  # rows per Arrow batch while validating
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SAVED_MARKERS = ("dataset_dict.json", "state.json")


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "reading CSV, Parquet, Arrow, JSON, save_to_disk folders or hub datasets needs the `datasets` "
            "package: pip install 'lorakit[data]' (JSONL files need nothing extra)."
        ) from e
    return datasets


def _data_files(path: str) -> list[Path] | None:
    """The local files behind ``path`` (None: not a local path, so maybe a hub id)."""
    parts = [p.strip() for p in path.split(",") if p.strip()]
    files: list[Path] = []
    for part in parts:
        if any(c in part for c in "*?["):
            hits = sorted(Path(h) for h in glob.glob(part, recursive=True) if Path(h).is_file())
            if not hits:
                raise DataError(f"data pattern {part!r} matches no file; check the path and the quoting.")
            files += hits
        elif Path(part).is_dir():
            files += _folder_files(Path(part))
        elif Path(part).is_file():
            files.append(Path(part))
        elif len(parts) == 1 and _HUB_ID.fullmatch(part) and Path(part).suffix not in BUILDERS:
            return None
        else:
            raise DataError(f"data file {part!r} does not exist; pass a file, a folder, a glob or a hub dataset id.")
    unknown = [str(f) for f in files if f.suffix not in BUILDERS]
    if unknown:
        raise DataError(f"data file {unknown[0]!r} has an unknown extension; expected one of {sorted(BUILDERS)}.")
    return files


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in BUILDERS)
    if not files:
        raise DataError(
            f"data directory {str(folder)!r} holds no *.jsonl, *.json, *.csv, *.parquet or *.arrow files and is not "
            "a save_to_disk folder; expected one or more data files."
        )
    return files


def _is_saved_dataset(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / m).is_file() for m in _SAVED_MARKERS)


def _pick_split(loaded: Any, split: str, where: str) -> Any:
    if hasattr(loaded, "keys"):  # a DatasetDict
        if split not in loaded:
            raise DataError(f"{where} has splits {sorted(loaded)}, not {split!r}; pass --data-split NAME.")
        return loaded[split]
    return loaded


def load_tables(path: str, split: str = "train", config: str | None = None) -> list[tuple[Any, str]]:
    """Open ``path`` as Arrow-backed ``datasets.Dataset`` tables, one per source file.

    Returns:
        ``[(dataset, label), ...]``; the label names the file (or hub split) in messages. Files are kept apart,
        so they need not share a schema.

    Raises:
        DataError: A missing path, a file type ``datasets`` cannot read, an unknown split, or a hub failure.
    """
    ds_lib = _datasets()
    if _is_saved_dataset(path):
        return [(_pick_split(ds_lib.load_from_disk(path), split, f"saved dataset {path!r}"), path)]
    files = _data_files(path)
    if files is None:
        return [(_load_hub(ds_lib, path, split, config), f"{path}[{split}]")]
    return [
        (ds_lib.load_dataset(BUILDERS[f.suffix], data_files=str(f), split="train", cache_dir=_cache_dir()), str(f))
        for f in files
    ]


def _load_hub(ds_lib: Any, repo_id: str, split: str, config: str | None) -> Any:
    try:
        return ds_lib.load_dataset(repo_id, name=config, split=split, cache_dir=_cache_dir())
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not load hub dataset {repo_id!r} (config {config!r}, split {split!r}): {first}. Check the id, "
            "--data-config and --data-split, and the network or HF_ENDPOINT; a local path must exist."
        ) from e


def _cache_dir() -> str | None:
    return os.environ.get("HF_DATASETS_CACHE") or None


class DatasetRows(LazyRows):
    """Validated rows of memory-mapped ``datasets.Dataset`` tables, materialized (normalized) on each access.

    Args:
        tables: ``(dataset, label)`` per source file (see `load_tables`).
        spec: How records map onto the trainer's formats.
        indices: The usable rows, as positions in the tables laid end to end (after ``--skip-bad-lines`` and
            train/eval splitting).
    """

    def __init__(self, tables: list[tuple[Any, str]], spec: RowSpec, indices: array) -> None:
        super().__init__(indices)
        self.tables, self.spec = tables, spec
        self.starts = [0]
        for dataset, _ in tables:
            self.starts.append(self.starts[-1] + len(dataset))

    def load(self, j: int) -> Row:
        k = bisect.bisect_right(self.starts, j) - 1
        data, fmt = normalize(self.tables[k][0][j - self.starts[k]], self.spec)
        return Row(data, self.where(j), fmt)

    def where(self, j: int) -> str:
        """``file row N`` (1-based within its file) for row ``j`` of the tables laid end to end."""
        k = bisect.bisect_right(self.starts, j) - 1
        return f"{self.tables[k][1]} row {j - self.starts[k] + 1}"


def _scan(tables: list[tuple[Any, str]], spec: RowSpec, skip_bad_lines: bool) -> DatasetRows:
    """Validate every row in Arrow batches; keep the indices of the good ones."""
    rows = DatasetRows(tables, spec, array("q"))
    good, bad = array("q"), []
    j = 0
    for dataset, _ in tables:
        for batch in dataset.iter(batch_size=SCAN_BATCH):
            names = list(batch)
            for values in zip(*(batch[n] for n in names)):
                try:
                    normalize(dict(zip(names, values)), spec)
                    good.append(j)
                except RowProblem as e:
                    if not skip_bad_lines:
                        raise DataError(
                            f"{rows.where(j)}: {e}. Fix the row or pass --skip-bad-lines to skip it."
                        ) from None
                    bad.append(f"{rows.where(j)}: {e}")
                j += 1
    if bad:
        logger.warning("skipped %d bad rows (first: %s)", len(bad), bad[0])
    if not good:
        raise DataError(f"data {tables[0][1]!r} holds no usable rows; expected one example per row.")
    rows.indices = good
    return rows


def _plain_jsonl(path: str) -> bool:
    """True for what the line-numbered JSONL reader handles: one ``.jsonl`` file or a folder of only those."""
    p = Path(path)
    if "," in path or any(c in path for c in "*?["):
        return False
    if p.is_dir():
        if _is_saved_dataset(path):
            return False
        suffixes = {f.suffix for f in p.iterdir() if f.is_file() and f.suffix in BUILDERS}
        return suffixes <= {".jsonl"}  # an empty folder: the JSONL reader's "no *.jsonl files" error
    return p.suffix == ".jsonl" or (p.suffix not in BUILDERS and not _looks_like_hub_id(path))


def _looks_like_hub_id(path: str) -> bool:
    return not Path(path).exists() and bool(_HUB_ID.fullmatch(path)) and Path(path).suffix not in BUILDERS


def read_rows(
    path: str | Path,
    spec: RowSpec | None = None,
    skip_bad_lines: bool = False,
    split: str = "train",
    config: str | None = None,
) -> Sequence[Row]:
    """Read and validate the rows of any supported source (see the module docstring).

    Args:
        path: File, folder, comma-separated files, glob, save_to_disk folder or hub dataset id.
        spec: Format and column names (default: detect each row).
        skip_bad_lines: Skip (and count in one warning) rows that fit no format instead of raising.
        split: Split of a hub dataset or a saved ``DatasetDict``.
        config: Configuration (subset) name of a hub dataset.

    Returns:
        The rows, lazy: `JsonlRows` (line offsets) or `DatasetRows` (positions in the memory-mapped tables).

    Raises:
        DataError: Missing source, unreadable file, or a row that fits no format (naming file and row).
    """
    spec = spec or RowSpec()
    path = str(path)
    if _plain_jsonl(path):
        return read_jsonl(path, skip_bad_lines, spec)
    return _scan(load_tables(path, split, config), spec, skip_bad_lines)


def read_train_eval(cfg: Any) -> tuple[Sequence[Row], Sequence[Row]]:
    """The train and eval rows of a `TrainConfig`: ``eval_data`` when given, else ``eval_ratio`` held out."""
    spec = RowSpec(cfg.format, cfg.text_column, cfg.prompt_column, cfg.completion_column, cfg.messages_column)
    rows = read_rows(cfg.data, spec, cfg.skip_bad_lines, cfg.data_split, cfg.data_config)
    if cfg.eval_data:
        split = cfg.eval_data_split or cfg.data_split
        return rows, read_rows(cfg.eval_data, spec, cfg.skip_bad_lines, split, cfg.data_config)
    return split_train_eval(rows, cfg.eval_ratio, cfg.seed)
