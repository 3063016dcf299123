"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

Layout under the run's output directory::

    run.json                      what run this directory holds (to refuse mixing runs)
    checkpoint-<step>/            adapter_config.json, adapter_model.safetensors (PEFT format),
                                  trainer_state.pt (everything else), trainer_state.json (readable summary)

A checkpoint is first written to a hidden temporary folder, then renamed into place, so a run killed at
any moment leaves either a whole checkpoint or none.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, FormatError
from lorakit.io.atomic import atomic_write_text, default_mode, replace_dir

RUN_FILE = "run.json"
STATE_FILE = "trainer_state.pt"
PREFIX = "checkpoint-"
# Fields that may change between a run and its resumption; every other TrainConfig field defines the run.
RUNTIME_FIELDS = frozenset(
    {
        "resume",
        "overwrite",
        "progress",
        "num_threads",
        "save_steps",
        "save_total_limit",
        "logging_steps",
        "eval_steps",
        "eval_generate",
        "eval_batch_size",
        "max_new_tokens",
        "skip_bad_lines",
        "precision",
        "fsdp",
        "dist_timeout",
    }
)
# Files a run writes at the top of its output directory (removed by --overwrite).
RUN_OUTPUTS = (
    "run.json",
    "metrics.jsonl",
    "loss.png",
    "adapter_config.json",
    "adapter_model.safetensors",
    "eval_results.json",
)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from (python, torch CPU, CUDA when present)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    out = []
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            step = p.name[len(PREFIX) :]
            if p.is_dir() and p.name.startswith(PREFIX) and step.isdigit() and (p / STATE_FILE).is_file():
                out.append((int(step), p))
    return sorted(out)


def save_checkpoint(output_dir: Path, step: int, save_adapter_fn, state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoint-<step>`` atomically and prune all but the newest ``keep``.

    Args:
        output_dir: The run directory.
        step: Optimizer steps done.
        save_adapter_fn: Called with a folder; writes the adapter there in PEFT format.
        state: Training state for ``trainer_state.pt`` (optimizer, scheduler, RNG, data position, ...).
        keep: How many checkpoints to keep.
    """
    final = output_dir / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".{PREFIX}{step}.", suffix=".tmp"))
    try:
        default_mode(tmp, directory=True)
        save_adapter_fn(tmp)
        torch.save(state, tmp / STATE_FILE)
        summary = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool)) or v is None}
        (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise FormatError(
            f"checkpoint {str(path)!r} is unreadable ({e}); delete it to resume from an older one."
        ) from e


def run_identity(config_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(config_dict.items()) if k not in RUNTIME_FIELDS}


def prepare_output_dir(output_dir: str | Path, config_dict: dict[str, Any], resume: bool, overwrite: bool) -> Path:
    """Create or check the run directory; refuse one that holds a different (or any, unless resuming) run.

    Raises:
        ConfigError: The directory holds another run and neither ``overwrite`` nor a matching ``resume`` was given,
            or ``resume`` was asked where there is nothing to resume.
    """
    d = Path(output_dir)
    identity = run_identity(config_dict)
    run_file = d / RUN_FILE
    existing = [p for p in d.iterdir() if not p.name.startswith(".")] if d.is_dir() else []
    if existing and overwrite:
        for p in existing:
            if p.name in RUN_OUTPUTS:
                p.unlink()
            elif p.is_dir() and p.name.startswith(PREFIX):
                shutil.rmtree(p)
    elif existing and not resume:
        what = "a lorakit run" if run_file.exists() else f"{len(existing)} other files"
        raise ConfigError(
            f"output directory {str(d)!r} already holds {what}; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --output-dir."
        )
    elif resume:
        if not run_file.exists() or not list_checkpoints(d):
            raise ConfigError(f"--resume: {str(d)!r} holds no checkpoint to resume; run without --resume to start.")
        old = json.loads(run_file.read_text(encoding="utf-8"))
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in identity.items() if old.get(k) != v]
        if diffs:
            raise ConfigError(
                f"--resume: {str(d)!r} holds a different run ({'; '.join(diffs)}); resume with the same settings "
                "or pass --overwrite to start over."
            )
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps(identity, indent=2, default=str) + "\n")
    return d
