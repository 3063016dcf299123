"""Training: data formats, label masking, the loop, evaluation, checkpoints and resume.

Python entry point: `run_training` (``lorakit train`` on the command line). The package itself is callable
too, so ``lorakit.train(config, **overrides)`` is ``run_training`` while ``lorakit.train.TrainConfig`` etc.
stay reachable. CLI wiring: `add_train_arguments` / `train_from_args` and `add_eval_arguments` / `eval_from_args`.
"""

import sys
import types

from lorakit.train.commands import add_eval_arguments, add_train_arguments, eval_from_args, train_from_args
from lorakit.train.config import TrainConfig, build_config
from lorakit.train.loop import TrainingStopped
from lorakit.train.preflight import PreflightError
from lorakit.train.run import TrainResult, run_training

__all__ = [
    "PreflightError",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "add_eval_arguments",
    "add_train_arguments",
    "build_config",
    "eval_from_args",
    "run_training",
    "train_from_args",
]


class _CallableModule(types.ModuleType):
    """Lets ``lorakit.train(...)`` run a training although ``lorakit.train`` is this package."""

    def __call__(self, config=None, **kwargs) -> TrainResult:
        return run_training(config, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
