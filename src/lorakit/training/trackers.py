"""Experiment trackers: TensorBoard, MLflow and Weights & Biases (offline by default), next to metrics.jsonl.

``--report-to tensorboard,mlflow,wandb`` opens one tracker per name in the run directory; every record the
training loop writes to ``metrics.jsonl`` (loss, lr, tokens/s, eval loss) goes to each of them at its step, the
run config is logged once, and the final eval metrics (``before/`` and ``after/`` the adapter) at the end.
Each tracker is an optional extra, imported only when named:

* ``tensorboard`` (``pip install 'lorakit[tensorboard]'``): event files in ``<run>/tensorboard/``.
* ``mlflow`` (``pip install 'lorakit[mlflow]'``): ``$MLFLOW_TRACKING_URI`` or a file store in ``<run>/mlruns``.
* ``wandb`` (``pip install 'lorakit[wandb]'``): ``WANDB_MODE`` or offline, files in ``<run>/wandb/``; no account
  is needed offline (``wandb sync`` uploads later).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from lorakit.errors import ConfigError

logger = logging.getLogger(__name__)
TRACKERS = ("tensorboard", "mlflow", "wandb")
_EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
_MODULE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class Tracker(Protocol):
    """What the loop needs from a tracker."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def parse_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` or a list -> validated names; ``none``/empty -> ()."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [s for v in value for s in str(v).split(",")]
    names = tuple(dict.fromkeys(s.strip().lower() for s in items if s.strip() and s.strip().lower() != "none"))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"report_to={value!r}: unknown tracker {unknown[0]!r}; expected a comma-separated list "
                          f"of {', '.join(TRACKERS)} (or none).")  # fmt: skip
    return names


def require_trackers(names: Sequence[str]) -> None:
    """Raise `ConfigError` naming the extra to install for the first tracker whose package is missing."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(_MODULE[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {name} package: pip install 'lorakit[{_EXTRA[name]}]'.")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, run_dir: Path, run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps the file store but asks for consent; a per-run folder needs no database server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit"))
        self.run = mlflow.start_run(run_name=run_name)

    def log_config(self, config: dict[str, Any]) -> None:
        self.mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in config.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in _scalars(metrics).items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, run_dir: Path, run_name: str) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        project = os.environ.get("WANDB_PROJECT", "lorakit")
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=mode, reinit="create_new")

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers named by ``report_to``, fanned out; a no-op when none is named.

    Args:
        names: Tracker names (see `parse_report_to`).
        run_dir: The run's output directory (each tracker writes below it unless told otherwise).
    """

    def __init__(self, names: Sequence[str], run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        names = parse_report_to(list(names))
        require_trackers(names)
        self.items: list[Tracker] = []
        try:
            for name in names:
                if name == "tensorboard":
                    self.items.append(TensorBoardTracker(run_dir))
                elif name == "mlflow":
                    self.items.append(MlflowTracker(run_dir, run_dir.name))
                else:
                    self.items.append(WandbTracker(run_dir, run_dir.name))
        except Exception:
            self.close()
            raise

    def log_config(self, config: dict[str, Any]) -> None:
        for t in self.items:
            t.log_config(config)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: its ``step`` is the x axis, the other numbers are logged."""
        metrics = {k: v for k, v in record.items() if k != "step"}
        if self.items and _scalars(metrics):
            for t in self.items:
                t.log_metrics(metrics, int(record["step"]))

    def log_final(self, step: int, before: dict[str, Any], after: dict[str, Any]) -> None:
        """Eval metrics of the base model and the adapter, as ``before/...`` and ``after/...``."""
        metrics = {f"before/{k}": v for k, v in before.items()} | {f"after/{k}": v for k, v in after.items()}
        self.log({"step": step, **metrics})

    def close(self) -> None:
        for t in self.items:
            try:
                t.close()
            except Exception as e:  # a tracker failing to flush must not hide the run's own result
                logger.warning("closing tracker %s failed: %s", type(t).__name__, e)
        self.items = []
