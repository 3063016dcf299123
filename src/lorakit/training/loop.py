"""The training loop: accumulation, clipping, schedule, checkpoints, resume, NaN and Ctrl-C handling.

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches from a stream whose order depends
only on ``(seed, epoch)``; the loss of a step is the mean over all its learned tokens (each micro-batch's
summed loss is divided by the step's token count), so accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist
from lorakit.training.collate import batch_order, collate, count_label_tokens
from lorakit.training.data import Example
from lorakit.training.distributed import Dist, DistributedError
from lorakit.training.loss import causal_lm_loss
from lorakit.training.packing import collate_packed
from lorakit.training.schedule import StopFlag, lr_lambda, param_groups
from lorakit.training.token_store import lengths_of
from lorakit.training.train_config import TrainConfig

__all__ = ["LoopState", "StopFlag", "Trainer", "TrainingStopped", "lr_lambda", "param_groups"]

logger = logging.getLogger(__name__)


class TrainingStopped(LorakitError):
    """Training stopped early (NaN loss); the message names the last good checkpoint."""


@dataclass
class LoopState:
    """Where the run is: optimizer steps done and the next micro-batch (epoch, index within the epoch)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class Trainer:
    """Trains the adapter parameters of ``model`` on tokenized ``examples``.

    Args:
        model: A model with one trainable adapter (named ``adapter_name``).
        examples: Tokenized training examples (a `TokenStore`: read back one micro-batch at a time).
        config: The run's settings.
        output_dir: Where checkpoints and ``metrics.jsonl`` go.
        pad_id: Padding token id.
        write_adapter_fn: Writes a (gathered) adapter state, as ``get_state`` returns it, in PEFT format into a
            folder.
        get_state / set_state: Read (detached full copies; collective under FSDP) / restore the adapter tensors.
        autocast: Context manager factory for mixed precision.
        eval_fn: Called at ``eval_steps``; returns the eval loss.
        on_first_backward: Called after the first backward of this process (the pre-flight gradient check).
        dist: This process's place in a multi-process run (default: a single process); see `distributed`.
        on_log: Also receives every record written to ``metrics.jsonl`` (the experiment trackers).

    ``examples`` may be packed rows (`lorakit.training.packing.PackedRow`, with ``config.packing``): they are then
    collated with restarting position ids instead of an attention mask.
    """

    def __init__(
        self,
        model,
        examples: Sequence[Example],
        config: TrainConfig,
        output_dir: Path,
        pad_id: int,
        write_adapter_fn: Callable[[Path, dict], None],
        get_state: Callable[[], dict],
        set_state: Callable[[dict], None],
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        eval_fn: Callable[[], float] | None = None,
        on_first_backward: Callable[[], None] | None = None,
        dist: Dist | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.model, self.examples, self.config, self.output_dir = model, examples, config, output_dir
        self.pad_id, self.write_adapter_fn, self.get_state, self.set_state = (
            pad_id,
            write_adapter_fn,
            get_state,
            set_state,
        )
        self.autocast, self.eval_fn, self.on_first_backward = autocast, eval_fn, on_first_backward
        self.dist = dist or Dist()
        self.on_log = on_log
        self.collate_fn = collate_packed if config.packing else collate
        self.lengths = lengths_of(examples)  # from the token store: no example is read back
        self.global_batch = config.batch_size * self.dist.world_size  # rows of one micro-batch over all processes
        batches = math.ceil(len(examples) / self.global_batch)
        self.steps_per_epoch = max(1, math.ceil(batches / config.gradient_accumulation_steps))
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.optimizer = torch.optim.AdamW(
            param_groups(model, config), lr=config.learning_rate, weight_decay=config.weight_decay
        )
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
            order = batch_order(
                self.lengths, self.global_batch, self.config.seed, self.state.epoch, self.config.group_by_length
            )
            while self.state.batch_in_epoch < len(order):
                idx = order[self.state.batch_in_epoch]
                self.state.batch_in_epoch += 1
                yield idx
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write ``checkpoint-<step>`` (rank 0 writes; every rank takes part in gathering and returns its path)."""
        d = self.dist
        adapter = self.get_state()
        optimizer = self._optimizer_state()
        rngs = dist.gather_objects(d, ckpt.rng_state(), "gathering RNG states for a checkpoint")
        path = None
        if d.is_main:
            state = {
                "step": self.state.step,
                "epoch": self.state.epoch,
                "batch_in_epoch": self.state.batch_in_epoch,
                "total_steps": self.total_steps,
                "loss": self.last_loss,
                "train_seconds": self.train_seconds,
                "tokens_seen": self.tokens_seen,
                "world_size": d.world_size,
                "fsdp": d.fsdp,
                "adapter": adapter,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs[0],
                "rng_ranks": rngs,
            }
            path = ckpt.save_checkpoint(
                self.output_dir,
                self.state.step,
                lambda p: self.write_adapter_fn(p, adapter),
                state,
                self.config.save_total_limit,
            )
        self.last_checkpoint = Path(dist.broadcast_object(d, str(path) if path else None, "writing a checkpoint"))
        return self.last_checkpoint

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.dist.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        if not self.dist.fsdp:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state, options=options)

    def resume(self) -> int:
        """Restore the newest checkpoint (rank 0 reads it and shares it); returns its step."""
        d = self.dist

        def read() -> tuple[Path, dict[str, Any]]:
            path = ckpt.list_checkpoints(self.output_dir)[-1][1]
            return path, ckpt.load_checkpoint_state(path)

        path, s = dist.on_main(d, read, "reading the checkpoint to resume")
        step = s["step"]
        written = (s.get("world_size", 1), bool(s.get("fsdp", False)))
        if written != (d.world_size, d.fsdp):
            how = f"{written[0]} process{'es' if written[0] > 1 else ''}" + (" with --fsdp" if written[1] else "")
            raise ConfigError(
                f"--resume: checkpoint {str(path)!r} was written by {how}, but this run has {d.world_size}"
                + (" with --fsdp" if d.fsdp else "")
                + "; resume with the same launcher settings (torchrun --nproc-per-node and --fsdp) as the run."
            )
        self.set_state(s["adapter"])
        self._load_optimizer_state(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        ckpt.set_rng_state(s.get("rng_ranks", [s["rng"]])[d.rank])
        self.state = LoopState(s["step"], s["epoch"], s["batch_in_epoch"])
        self.last_loss, self.train_seconds = s.get("loss"), s.get("train_seconds", 0.0)
        self.tokens_seen = s.get("tokens_seen", 0)
        self.last_checkpoint = path
        logger.info("resumed from %s (step %d of %d)", path, step, self.total_steps)
        return step

    # --- one step ----------------------------------------------------------------------------------------
    def _local_batch(self, idx: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        """This process's rows of a global micro-batch, collated, and their token count.

        A process whose slice is empty (a short last batch) runs one row with every label ignored: it adds nothing
        to the loss or the gradients but keeps the processes' collectives in step (FSDP gathers in every forward).
        """
        mine, _ = dist.shard(idx, self.dist)
        if mine:
            rows = [self.examples[i] for i in mine]
            return self.collate_fn(rows, self.pad_id), sum(len(r) for r in rows)
        return self.collate_fn([self.examples[idx[0]].without_labels()], self.pad_id), 0

    def _step(self, stream: Iterator[list[int]], stop: Callable[[], bool] = lambda: False) -> tuple[float, int, bool]:
        """One optimizer step: (mean loss per learned token, tokens processed, stop requested on any process).

        A NaN/inf loss or gradient is not stepped (the loss returned is NaN on every process).
        """
        d = self.dist
        batches = [self._local_batch(next(stream)) for _ in range(self.config.gradient_accumulation_steps)]
        device = next(p for p in self.model.parameters() if p.requires_grad).device
        n_learned = sum(count_label_tokens(b) for b, _ in batches)
        if d.enabled:
            n_learned = int(dist.all_sum(d, [n_learned], "counting the step's learned tokens")[0])
        # Each process's summed loss over the global token count: gradients summed over processes are the mean.
        # FSDP averages in its reduce-scatter, so its backward runs on the loss scaled up by the world size.
        grad_scale = d.world_size if d.fsdp else 1
        total, tokens = 0.0, 0
        for b, n_tokens in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with self.autocast():
                loss = causal_lm_loss(self.model, b, reduction="sum", split_head=not d.fsdp) / max(1, n_learned)
            if not d.enabled and not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan"), tokens, stop()
            (loss * grad_scale).backward()
            total += float(loss.detach())
            tokens += n_tokens
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        requested = stop()
        if d.enabled:
            if not d.fsdp:
                dist.reduce_gradients(d, params)
            total, summed_tokens, stops = dist.all_sum(d, [total, tokens, float(requested)])
            tokens, requested = int(summed_tokens), stops > 0
            if not math.isfinite(total):
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan"), tokens, requested
        if self.on_first_backward is not None:
            self.on_first_backward()
            self.on_first_backward = None
        if self.config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan"), tokens, requested
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, tokens, requested

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.on_log is not None:
            self.on_log(record)

    def train(self) -> str:
        """Run to ``total_steps``; returns "completed" or "interrupted" (Ctrl-C, after a checkpoint).

        Raises:
            TrainingStopped: The loss or gradient became NaN/inf; the adapter is left at the last good step.
            DistributedError: Another process died or stalled (multi-process runs); names the last checkpoint.
        """
        try:
            return self._train()
        except DistributedError as e:
            raise DistributedError(f"{e}. {self._where_to_resume()}") from e
        except RuntimeError as e:
            if self.dist.enabled and dist.is_collective_failure(e):  # raised inside FSDP's own collectives
                raise DistributedError(
                    f"{dist.lost_contact(self.dist, 'training', e)}. {self._where_to_resume()}"
                ) from e
            raise

    def _where_to_resume(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint had been written yet"
        return f"The last checkpoint is {self.last_checkpoint}; rerun the same command with --resume to continue"

    def _train(self) -> str:
        from tqdm.auto import tqdm

        self.model.train()
        stream = self._micro_batches()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            disable=not (self.config.progress and self.dist.is_main),
            desc="train",
            dynamic_ncols=True,
        )
        window_tokens, window_start = 0, time.perf_counter()
        try:
            with StopFlag() as stop:
                while self.state.step < self.total_steps:
                    t0 = time.perf_counter()
                    loss, tokens, stop_agreed = self._step(stream, lambda: stop.requested)
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
                        self._log(
                            {
                                "step": step,
                                "epoch": round(step / self.steps_per_epoch, 3),
                                "loss": loss,
                                "lr": lr,
                                "tokens_per_s": round(tps, 1),
                                "train_seconds": round(self.train_seconds, 2),
                            }
                        )
                        window_tokens, window_start = 0, time.perf_counter()
                    if self.eval_fn and self.config.eval_steps and step % self.config.eval_steps == 0:
                        self._log({"step": step, "eval_loss": self.eval_fn()})  # every process evaluates its shard
                    # processes must agree on stopping; a single one may also act on a Ctrl-C that came after
                    stop_requested = stop_agreed if self.dist.enabled else stop.requested
                    if step % self.config.save_steps == 0 or step == self.total_steps or stop_requested:
                        self.save()
                    if stop_requested and step < self.total_steps:
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
