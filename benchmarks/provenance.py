"""Where a results file came from (machine, date, commit, exact command), and the measuring plumbing benchmarks share.

Every script that writes ``benchmarks/results/*.json`` for a README figure puts ``provenance(...)`` under the
key ``"provenance"``, so a number can be traced to the run that made it. ``write_results`` writes atomically.
Memory benchmarks measure in fresh processes: `json_worker` runs one and reads the JSON line it prints last;
inside it, `status_kib` reads ``/proc/self/status`` and `reset_peak_rss` restarts the peak (``VmHWM``) from the
current RSS, so the peak a worker reports is what its measured steps needed, not what building the model took.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The hardware and software a measurement ran on."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def provenance(command: list[str] | str | None = None) -> dict[str, Any]:
    """Machine, UTC date, git commit (and whether the tree had uncommitted changes) and the command.

    Take it when the run starts (the commit and date of the code that ran); `finish` adds the end time.

    Args:
        command: The command that produced the results (default: this process's own command line).
    """
    if command is None:
        command = [Path(sys.executable).name, *sys.argv]
    if not isinstance(command, str):
        command = shlex.join(command)
    return {
        "command": command,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # a device machine's copy of the tree may carry a stale .git: the caller names the commit in LORAKIT_COMMIT
        "commit": os.environ.get("LORAKIT_COMMIT") or _git("rev-parse", "--short=12", "HEAD"),
        # code, not results: other benchmarks running beside this one rewrite files in benchmarks/results/
        "uncommitted_changes": bool(
            _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
        ),  # fmt: skip
        "machine": machine(),
    }


def finish(prov: dict[str, Any]) -> dict[str, Any]:
    """Add the end time and the load average at the end to a `provenance` taken when the run started."""
    prov["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        prov["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return prov


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every value: what a noisy measurement is reported with (no cherry-picking)."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def write_results(path: Path | str, results: dict[str, Any]) -> Path:
    """Write ``results`` as indented JSON, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: resident now, ``VmHWM``: the peak); -1 when absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Restart the peak RSS (``VmHWM``) from the current RSS; False where ``/proc/self/clear_refs`` is not writable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def json_worker(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (a benchmark's ``--worker`` mode) in a fresh process; the JSON object it printed last."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])
