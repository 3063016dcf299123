"""`run_training`: one call from a config to a trained, evaluated adapter on disk.

Order of work: read and validate the data (fail before loading a model), check the output directory, load
the model, add the adapter, tokenize, pre-flight checks, evaluate the base model, train (or resume), save
the adapter, evaluate it, plot the loss and return a `TrainResult`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters import trainable_parameters
from lorakit.errors import ConfigError
from lorakit.io.atomic import atomic_write_text
from lorakit.io.saving import save_adapter
from lorakit.merging import disabled
from lorakit.plots import loss_png
from lorakit.state import adapter_state_dict
from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist
from lorakit.training import model_setup, preflight
from lorakit.training.data import display_prompt
from lorakit.training.evaluate import eval_loss, format_table, generation_eval
from lorakit.training.loop import Trainer
from lorakit.training.packing import check_packing_support, pack
from lorakit.training.precision import choose_threads, make_autocast
from lorakit.training.sources import read_train_eval
from lorakit.training.token_store import tokenize_rows
from lorakit.training.trackers import Trackers, parse_report_to, require_trackers
from lorakit.training.train_config import TrainConfig, build_config

logger = logging.getLogger("lorakit.training")
ADAPTER = model_setup.ADAPTER


@dataclass
class TrainResult:
    """What a run produced. ``before``/``after`` hold exact_match, normalized_match, eval_loss (or are empty)."""

    output_dir: Path
    status: str  # "completed" | "interrupted"
    steps: int
    total_steps: int
    train_seconds: float
    final_loss: float | None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    adapter_bytes: int = 0
    trainable_params: int = 0
    total_params: int = 0
    samples: list[dict[str, str]] = field(default_factory=list)
    rank: int = 0  # under torchrun: this process's rank (every process returns the same result; rank 0 reports)

    def table(self) -> str:
        return format_table({"before": self.before, "after": self.after})


def _eval_all(model, tokenizer, cfg, eval_rows, eval_examples, pad_id, autocast, d: dist.Dist) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if eval_examples:
        out["eval_loss"] = eval_loss(model, eval_examples, pad_id, cfg.eval_batch_size, autocast, d)
    gen_rows = [r for r in eval_rows if r.format != "text"]
    if cfg.eval_generate and eval_rows and not gen_rows:
        logger.info("generation eval skipped: the eval rows are 'text' rows with no completion to compare against")
    if cfg.eval_generate and gen_rows:
        g = generation_eval(
            model, tokenizer, gen_rows, cfg.chat_template, cfg.max_new_tokens, cfg.eval_batch_size, autocast, d
        )
        out.update(g.summary())
        out["samples"] = [
            {"prompt": display_prompt(row), "reference": r, "prediction": x}
            for row, r, x in list(zip(gen_rows, g.references, g.predictions))[:3]
        ]
    return out


def _eval_loss_fn(model, examples, pad_id, batch_size, autocast, d: dist.Dist):
    if not examples:
        return None
    return lambda: eval_loss(model, examples, pad_id, batch_size, autocast, d)


def run_training(
    config: TrainConfig | dict | str | None = None, *, model=None, tokenizer=None, **overrides: Any
) -> TrainResult:
    """Fine-tune a LoRA adapter; the Python face of ``lorakit train``.

    Args:
        config: A `TrainConfig`, a dict of its fields, or a YAML file path; ``overrides`` (field=value) win.
        model: An already loaded causal LM (default: ``lorakit.models.load_model(config.model)``).
        tokenizer: Its tokenizer (required with ``model``).
        **overrides: `TrainConfig` fields, e.g. ``max_steps=100``.

    Returns:
        The result; the adapter is in ``result.output_dir`` (PEFT format), checkpoints in sub-folders.

    Raises:
        ConfigError: Bad settings, or an output directory that holds another run.
        DataError: Missing, empty or malformed data.
        TrainingStopped: NaN/inf loss; the message names the last good checkpoint.
    """
    if isinstance(config, TrainConfig):
        cfg = build_config(None, **{**config.to_dict(), **overrides})
    elif isinstance(config, dict):
        cfg = build_config(None, **{**config, **overrides})
    else:
        cfg = build_config(config, **overrides)
    cfg.require_paths()
    threads = torch.get_num_threads()
    try:
        if model is None or next(model.parameters()).device.type == "cpu":
            choose_threads(cfg.num_threads)
        d = dist.setup("fsdp" if cfg.fsdp else "ddp", cfg.dist_timeout)
        quiet = logging.getLogger("lorakit")
        level = quiet.level
        try:
            if not d.is_main:  # one process reports: rank 0
                quiet.setLevel(logging.WARNING)
            return _run(cfg, model, tokenizer, d)
        finally:
            quiet.setLevel(level)
            dist.teardown(d)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, model, tokenizer, d: dist.Dist) -> TrainResult:
    if model is not None and tokenizer is None:
        raise ConfigError(
            "run_training(model=...) also needs tokenizer=...: pass the tokenizer that goes with the model"
        )
    run_cfg = dist.on_main(d, lambda: model_setup.per_process_batch(cfg, d), "checking the batch size")
    rows, eval_rows = read_train_eval(cfg)
    require_trackers(parse_report_to(cfg.report_to))  # a missing extra fails before the model loads
    out = dist.on_main(
        d,
        lambda: ckpt.prepare_output_dir(cfg.output_dir, cfg.to_dict(), cfg.resume, cfg.overwrite),
        "checking the output directory",
    )
    _log_processes(run_cfg, d)
    model, tokenizer = model_setup.prepare_model(cfg, model, tokenizer, d)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples = tokenize_rows(rows, tokenizer, cfg.max_length, cfg.mask_prompt, cfg.chat_template)[0]
    eval_examples = []
    if eval_rows:
        eval_examples = tokenize_rows(eval_rows, tokenizer, cfg.max_length, cfg.mask_prompt, cfg.chat_template)[0]
    logger.info("data: %d train / %d eval examples", len(train_examples), len(eval_examples))
    if cfg.packing:
        train_examples = _pack(model, train_examples, cfg.max_length)
    model_setup.preflight_model(model, d)
    autocast = make_autocast(cfg.precision, next(model.parameters()).device)
    evals = _Evals(model, tokenizer, cfg, eval_rows, eval_examples, pad_id, autocast, d)
    trainer = _make_trainer(model, train_examples, run_cfg, out, pad_id, autocast, evals, d)
    trackers = Trackers(parse_report_to(cfg.report_to) if d.is_main else (), out)
    trainer.on_log = trackers.log
    try:
        trackers.log_config(cfg.to_dict())
        result = _train(cfg, trainer, evals, out, d)
        if result.status == "completed":
            trackers.log_final(result.steps, result.before, result.after)
        return result
    finally:
        trackers.close()


def _train(cfg: TrainConfig, trainer: Trainer, evals: _Evals, out: Path, d: dist.Dist) -> TrainResult:
    """Evaluate the base, train (or resume), then save and evaluate the adapter."""
    model = evals.model
    before = _eval_before(out, cfg, evals, d)
    if cfg.resume:
        trainer.resume()  # restores the RNG state saved with the checkpoint
    else:
        torch.manual_seed(cfg.seed + d.rank)  # the same stream whatever pre-flight and eval drew; one per process
    logger.info("training %d steps (%d per epoch) ...", trainer.total_steps, trainer.steps_per_epoch)
    status = "interrupted"
    try:
        status = trainer.train()
    finally:
        if d.is_main:
            loss_png(out / "metrics.jsonl", out / "loss.png")
    result = TrainResult(
        out,
        status,
        trainer.state.step,
        trainer.total_steps,
        trainer.train_seconds,
        trainer.last_loss,
        before=before,
        rank=d.rank,
    )
    result.trainable_params, result.total_params = trainable_parameters(model)
    if status != "completed":
        logger.warning(
            "stopped at step %d; checkpoint %s; continue with --resume.", result.steps, trainer.last_checkpoint
        )
        return result
    return _finish(result, model, evals, d)


def _pack(model, examples, max_length: int):
    """``--packing``: the examples packed into ``max_length`` rows (see `lorakit.training.packing`)."""
    check_packing_support(model)
    packed = pack(examples, max_length)
    waste = 1 - int(packed.lengths.sum()) / (max_length * len(packed))
    logger.info(
        "packing: %d examples -> %d rows of <= %d tokens (%.1f%% of the row tokens are padding)",
        len(examples), len(packed), max_length, 100 * waste,
    )  # fmt: skip
    return packed


def _log_processes(run_cfg: TrainConfig, d: dist.Dist) -> None:
    if not d.enabled:
        return
    per_step = run_cfg.batch_size * run_cfg.gradient_accumulation_steps * d.world_size
    logger.info(
        "%d processes (%s, %s): global batch %d = %d per process x %d accumulation x %d",
        d.world_size,
        "FSDP2" if d.fsdp else "replicated",
        "nccl" if torch.cuda.is_available() else "gloo",
        per_step,
        run_cfg.batch_size,
        run_cfg.gradient_accumulation_steps,
        d.world_size,
    )


@dataclass
class _Evals:
    """What evaluating the model needs (the same before and after training)."""

    model: Any
    tokenizer: Any
    cfg: TrainConfig
    rows: list[dict]
    examples: list
    pad_id: int
    autocast: Any
    d: dist.Dist

    def run(self) -> dict[str, Any]:
        return _eval_all(
            self.model, self.tokenizer, self.cfg, self.rows, self.examples, self.pad_id, self.autocast, self.d
        )


def _make_trainer(model, train_examples, run_cfg, out: Path, pad_id: int, autocast, evals: _Evals, d) -> Trainer:
    return Trainer(
        model,
        train_examples,
        run_cfg,
        out,
        pad_id,
        write_adapter_fn=lambda p, state: save_adapter(model, p, ADAPTER, state_dict=state),
        get_state=lambda: dist.full_state(adapter_state_dict(model, ADAPTER)),
        set_state=lambda s: model_setup.set_adapter_state(model, s, d),
        autocast=autocast,
        eval_fn=_eval_loss_fn(model, evals.examples, pad_id, evals.cfg.eval_batch_size, autocast, d),
        on_first_backward=lambda: preflight.check_gradients(model, ADAPTER),
        dist=d,
    )


def _eval_before(out: Path, cfg: TrainConfig, evals: _Evals, d: dist.Dist) -> dict[str, Any]:
    """The base model's eval results (read back from ``eval_before.json`` when resuming)."""
    before_file = out / "eval_before.json"
    if cfg.resume and before_file.is_file():
        return json.loads(before_file.read_text(encoding="utf-8"))
    logger.info("evaluating the base model on %d eval examples ...", len(evals.rows))
    with disabled(evals.model):
        before = evals.run()
    if d.is_main:
        atomic_write_text(before_file, json.dumps(before, indent=2) + "\n")
    return before


def _finish(result: TrainResult, model, evals: _Evals, d: dist.Dist) -> TrainResult:
    """Write the final adapter (rank 0), evaluate it, and write ``eval_results.json``."""
    out = result.output_dir
    final = dist.full_state(adapter_state_dict(model, ADAPTER))
    if d.is_main:  # PiSSA / OLoRA: written relative to the original base, which is what users load it on
        init = str(evals.cfg.init_lora_weights)
        convert = init == "olora" or init.startswith("pissa")
        save_adapter(model, out, ADAPTER, state_dict=final, convert_to_lora=convert)
    dist.barrier(d, "waiting for rank 0 to write the adapter")
    result.adapter_bytes = sum(f.stat().st_size for f in out.glob("adapter_*") if f.is_file())
    logger.info("evaluating the adapter ...")
    result.after = evals.run()
    result.samples = result.after.pop("samples", [])
    result.before.pop("samples", None)
    summary = {
        "before": result.before,
        "after": result.after,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 1),
        "adapter_bytes": result.adapter_bytes,
        "trainable_params": result.trainable_params,
        "samples": result.samples,
    }
    if d.is_main:
        atomic_write_text(out / "eval_results.json", json.dumps(summary, indent=2) + "\n")
        _write_card(out, evals.cfg, result)
    return result


def _write_card(out: Path, cfg: TrainConfig, result: TrainResult) -> None:
    """The adapter's model card, now with the training settings and the eval table (base vs adapter)."""
    from lorakit.model_card import CardInfo, update_card

    training = {"data": cfg.data, "eval data": cfg.eval_data or f"{cfg.eval_ratio:.0%} held out",
                "steps": f"{result.steps} (batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation)",
                "learning_rate": f"{cfg.learning_rate:g} ({cfg.lr_scheduler}, warmup {cfg.warmup_ratio:g})",
                "max_length": cfg.max_length, "loss on": "completions only" if cfg.mask_prompt else "all tokens",
                "seed": cfg.seed, "train time": f"{result.train_seconds:.0f} s",
                "final loss": result.final_loss}  # fmt: skip
    update_card(out, CardInfo(training=training, eval_table=result.table(), title=out.name), result.trainable_params)
