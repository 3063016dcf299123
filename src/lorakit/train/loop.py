"""The training loop: accumulation, clipping, schedule, checkpoints, resume, NaN and Ctrl-C handling.

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches from a stream whose order depends
only on ``(seed, epoch)``; the loss of a step is the mean over all its learned tokens (each micro-batch's
summed loss is divided by the step's token count), so accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.train import checkpoint as ckpt
from lorakit.train.collate import batch_order, collate, count_label_tokens
from lorakit.train.config import TrainConfig
from lorakit.train.data import Example
from lorakit.train.loss import causal_lm_loss

logger = logging.getLogger(__name__)


class TrainingStopped(LorakitError):
    """Training stopped early (NaN loss); the message names the last good checkpoint."""


@dataclass
class LoopState:
    """Where the run is: optimizer steps done and the next micro-batch (epoch, index within the epoch)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


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


class Trainer:
    """Trains the adapter parameters of ``model`` on tokenized ``examples``.

    Args:
        model: A model with one trainable adapter (named ``adapter_name``).
        examples: Tokenized training examples.
        config: The run's settings.
        output_dir: Where checkpoints and ``metrics.jsonl`` go.
        pad_id: Padding token id.
        save_adapter_fn: Writes the adapter in PEFT format into a given folder.
        get_state / set_state: Read / restore the adapter tensors (exact, for resume).
        autocast: Context manager factory for mixed precision.
        eval_fn: Called at ``eval_steps``; returns the eval loss.
        on_first_backward: Called after the first backward of this process (the pre-flight gradient check).
    """

    def __init__(self, model, examples: list[Example], config: TrainConfig, output_dir: Path, pad_id: int,
                 save_adapter_fn: Callable[[Path], None], get_state: Callable[[], dict],
                 set_state: Callable[[dict], None], autocast: Callable[[], AbstractContextManager] = nullcontext,
                 eval_fn: Callable[[], float] | None = None,
                 on_first_backward: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.model, self.examples, self.config, self.output_dir = model, examples, config, output_dir
        self.pad_id, self.save_adapter_fn, self.get_state, self.set_state = (
            pad_id,
            save_adapter_fn,
            get_state,
            set_state,
        )
        self.autocast, self.eval_fn, self.on_first_backward = autocast, eval_fn, on_first_backward
        self.lengths = [len(e) for e in examples]
        batches = math.ceil(len(examples) / config.batch_size)
        self.steps_per_epoch = max(1, math.ceil(batches / config.gradient_accumulation_steps))
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)  # fmt: skip
        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.lr_scheduler, warmup, self.total_steps)
        )
        self.state = LoopState()
        self.last_checkpoint: Path | None = None
        self.last_loss: float | None = None
        self.tokens_seen = 0
        self.train_seconds = 0.0

    # --- data stream -------------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[list[int]]:
        """Endless batches from the current position; advances ``self.state`` as it yields."""
        while True:
            order = batch_order(self.lengths, self.config.batch_size, self.config.seed, self.state.epoch,
                                self.config.group_by_length)  # fmt: skip
            while self.state.batch_in_epoch < len(order):
                idx = order[self.state.batch_in_epoch]
                self.state.batch_in_epoch += 1
                yield idx
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> Path:
        state = {
            "step": self.state.step, "epoch": self.state.epoch, "batch_in_epoch": self.state.batch_in_epoch,
            "total_steps": self.total_steps, "loss": self.last_loss, "train_seconds": self.train_seconds,
            "tokens_seen": self.tokens_seen, "adapter": {k: v.detach().clone() for k, v in self.get_state().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(),
        }  # fmt: skip
        self.last_checkpoint = ckpt.save_checkpoint(
            self.output_dir, self.state.step, self.save_adapter_fn, state, self.config.save_total_limit
        )
        return self.last_checkpoint

    def resume(self) -> int:
        """Restore the newest checkpoint; returns its step."""
        step, path = ckpt.list_checkpoints(self.output_dir)[-1]
        s = ckpt.load_checkpoint_state(path)
        self.set_state(s["adapter"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        ckpt.set_rng_state(s["rng"])
        self.state = LoopState(s["step"], s["epoch"], s["batch_in_epoch"])
        self.last_loss, self.train_seconds = s.get("loss"), s.get("train_seconds", 0.0)
        self.tokens_seen = s.get("tokens_seen", 0)
        self.last_checkpoint = path
        logger.info("resumed from %s (step %d of %d)", path, step, self.total_steps)
        return step

    # --- one step ----------------------------------------------------------------------------------------
    def _step(self, stream: Iterator[list[int]]) -> tuple[float, int]:
        """One optimizer step; returns (mean loss per learned token, tokens processed). NaN is not stepped."""
        batches = [collate([self.examples[i] for i in next(stream)], self.pad_id)
                   for _ in range(self.config.gradient_accumulation_steps)]  # fmt: skip
        device = next(p for p in self.model.parameters() if p.requires_grad).device
        n_learned = max(1, sum(count_label_tokens(b) for b in batches))
        total, tokens = 0.0, 0
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with self.autocast():
                loss = causal_lm_loss(self.model, b, reduction="sum") / n_learned
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan"), tokens
            loss.backward()
            total += float(loss.detach())
            tokens += int(b["attention_mask"].sum())
        if self.on_first_backward is not None:
            self.on_first_backward()
            self.on_first_backward = None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan"), tokens
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, tokens

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train(self) -> str:
        """Run to ``total_steps``; returns "completed" or "interrupted" (Ctrl-C, after a checkpoint).

        Raises:
            TrainingStopped: The loss or gradient became NaN/inf; the adapter is left at the last good step.
        """
        from tqdm.auto import tqdm

        self.model.train()
        stream = self._micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.config.progress,
                   desc="train", dynamic_ncols=True)  # fmt: skip
        window_tokens, window_start = 0, time.perf_counter()
        try:
            with StopFlag() as stop:
                while self.state.step < self.total_steps:
                    t0 = time.perf_counter()
                    loss, tokens = self._step(stream)
                    self.train_seconds += time.perf_counter() - t0
                    if math.isnan(loss):
                        raise TrainingStopped(self._nan_message())
                    self.state.step += 1
                    self.last_loss, self.tokens_seen = loss, self.tokens_seen + tokens
                    window_tokens += tokens
                    lr = self.scheduler.get_last_lr()[0]
                    tps = window_tokens / max(1e-9, time.perf_counter() - window_start)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", refresh=False)
                    bar.update(1)
                    step = self.state.step
                    if step % self.config.logging_steps == 0 or step == self.total_steps:
                        self._log({"step": step, "epoch": round(step / self.steps_per_epoch, 3), "loss": loss,
                                   "lr": lr, "tokens_per_s": round(tps, 1),
                                   "train_seconds": round(self.train_seconds, 2)})  # fmt: skip
                        window_tokens, window_start = 0, time.perf_counter()
                    if self.eval_fn and self.config.eval_steps and step % self.config.eval_steps == 0:
                        self._log({"step": step, "eval_loss": self.eval_fn()})
                    if step % self.config.save_steps == 0 or step == self.total_steps or stop.requested:
                        self.save()
                    if stop.requested and step < self.total_steps:
                        return "interrupted"
        finally:
            bar.close()
        return "completed"

    def _nan_message(self) -> str:
        where = (
            f"the last good checkpoint is {self.last_checkpoint} (step {self.state.step})"
            if self.last_checkpoint
            else "no checkpoint had been written yet"
        )
        return (
            f"loss or gradient became NaN/inf at step {self.state.step + 1}; training stopped and {where}. "
            "Lower --learning-rate, keep --max-grad-norm set, or use --precision fp32."
        )
