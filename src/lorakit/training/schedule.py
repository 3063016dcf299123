"""Optimizer pieces of the training loop: parameter groups (LoRA+), the learning-rate schedule, Ctrl-C handling."""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.training.train_config import TrainConfig

logger = logging.getLogger("lorakit.training.loop")


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at step ``s``: linear warmup, then cosine/linear decay to 0 or constant."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress

    return f


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Only trainable (adapter) parameters; with LoRA+ the B matrices get ``loraplus_lr_ratio`` x the lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LorakitError("the model has no trainable parameters; was an adapter added with trainable=True?")
    if config.loraplus_lr_ratio is None:
        return [{"params": [p for _, p in named], "lr": config.learning_rate}]
    is_b = [".lora_B." in f".{n}." or ".lora_embedding_B." in f".{n}." for n, _ in named]
    groups = [
        {"params": [p for (_, p), b in zip(named, is_b) if not b], "lr": config.learning_rate},
        {"params": [p for (_, p), b in zip(named, is_b) if b], "lr": config.learning_rate * config.loraplus_lr_ratio},
    ]
    return [g for g in groups if g["params"]]


class StopFlag:
    """Turns the first Ctrl-C into a request to checkpoint and stop at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to abort).")

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
