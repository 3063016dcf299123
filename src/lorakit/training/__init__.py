"""Training: data formats, label masking, the loop, evaluation, checkpoints and resume.

Python entry points: `run_training` (also ``lorakit.train(...)``, and ``lorakit train`` on the command line) and
`TrainConfig`; the command-line wiring lives in `lorakit.commands.train` and `lorakit.commands.eval`.
"""

from lorakit.training.loop import TrainingStopped
from lorakit.training.preflight import PreflightError
from lorakit.training.run import TrainResult, run_training
from lorakit.training.train_config import TrainConfig, build_config

__all__ = [
    "PreflightError",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "build_config",
    "run_training",
]
