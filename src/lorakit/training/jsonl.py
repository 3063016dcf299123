"""JSONL training files, read lazily.

One validating pass keeps each good line's byte offset, and a row is parsed again from its line when it is used,
so a file larger than memory costs about 30 bytes per row.

Errors name the file and the line (``data.jsonl:17``).
"""

from __future__ import annotations

import json
import logging
from array import array
from pathlib import Path
from typing import IO

from lorakit.errors import DataError
from lorakit.training.data import LazyRows, Row
from lorakit.training.formats import RowProblem, RowSpec, normalize

logger = logging.getLogger(__name__)


def jsonl_files(path: str | Path) -> list[Path]:
    """The JSONL files behind ``path``: the file itself, or every ``*.jsonl`` in a directory (sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".jsonl" and f.is_file())
        if not files:
            raise DataError(f"data directory {str(p)!r} holds no *.jsonl files; expected one or more JSONL files.")
        return files
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist; pass a JSONL file or a directory of them.")
    return [p]


class JsonlRows(LazyRows):
    """The good lines of JSONL files: ``offsets[j]`` / ``lines[j]`` / ``file_of[j]`` locate line ``j``.

    Args:
        files: The JSONL files, in order.
        spec: How records map onto the trainer's formats.
    """

    def __init__(self, files: list[Path], spec: RowSpec) -> None:
        super().__init__(array("q"))
        self.files, self.spec = files, spec
        self.offsets, self.lines, self.file_of = array("q"), array("q"), array("i")
        self._handles: dict[int, IO[bytes]] = {}

    def load(self, j: int) -> Row:
        k = self.file_of[j]
        f = self._handles.get(k)
        if f is None:
            f = self._handles[k] = open(self.files[k], "rb")  # noqa: SIM115 (kept open: rows are read one by one)
        f.seek(self.offsets[j])
        data, fmt = normalize(json.loads(f.readline()), self.spec)
        return Row(data, f"{self.files[k]}:{self.lines[j]}", fmt)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def scan(self, skip_bad_lines: bool) -> list[str]:
        """Validate every line once, keeping the good ones; returns the problems of the skipped ones.

        Raises:
            DataError: A bad line (naming file and line) unless ``skip_bad_lines``.
        """
        bad: list[str] = []
        for k, file in enumerate(self.files):
            offset = 0
            with open(file, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue
                    problem = _line_problem(line, self.spec)
                    if problem is None:
                        self.indices.append(len(self.offsets))
                        self.offsets.append(start)
                        self.lines.append(lineno)
                        self.file_of.append(k)
                    elif skip_bad_lines:
                        bad.append(f"{file}:{lineno}: {problem}")
                    else:
                        raise DataError(
                            f"{file}:{lineno}: line {problem}. Fix the line or pass --skip-bad-lines to skip it."
                        )
        return bad


def _line_problem(line: bytes, spec: RowSpec) -> str | None:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        return f"is not UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    try:
        normalize(record, spec)
    except RowProblem as e:
        return str(e)
    return None


def read_jsonl(path: str | Path, skip_bad_lines: bool = False, spec: RowSpec | None = None) -> JsonlRows:
    """Read and validate every row of a JSONL file or directory.

    Args:
        path: A ``.jsonl`` file or a directory of them.
        skip_bad_lines: Skip (and count in one warning) lines that are not JSON or lack the needed keys,
            instead of raising.
        spec: Format and column names to expect (default: detect each row; see `lorakit.training.formats`).

    Returns:
        The rows, in file order: a lazy sequence that parses a line again when the row is used.

    Raises:
        DataError: A missing or empty file, a bad line (naming file and line) unless skipped, or no
            usable row at all.
    """
    rows = JsonlRows(jsonl_files(path), spec or RowSpec())
    bad = rows.scan(skip_bad_lines)
    if bad:
        logger.warning("skipped %d bad lines (first: %s)", len(bad), bad[0])
    if not len(rows):
        raise DataError(f"data {str(path)!r} holds no usable rows; expected JSONL with one example per line.")
    return rows
