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

from lorakit.train import checkpoint as ckpt
from lorakit.train import preflight
from lorakit.train.config import TrainConfig, build_config
from lorakit.train.data import display_prompt, read_jsonl, split_train_eval, tokenize_rows
from lorakit.train.evaluate import eval_loss, format_table, generation_eval
from lorakit.train.loop import Trainer
from lorakit.train.plot import plot_loss
from lorakit.train.precision import choose_threads, make_autocast

logger = logging.getLogger("lorakit.train")
ADAPTER = "default"


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

    def table(self) -> str:
        return format_table({"before": self.before, "after": self.after})


def _load_model(name: str):
    from lorakit.models import load_model

    return load_model(name)


def _lora_config(cfg: TrainConfig, model: torch.nn.Module):
    from lorakit import LoraConfig

    targets = list(cfg.target_modules) if isinstance(cfg.target_modules, tuple) else cfg.target_modules
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.r
    return LoraConfig(r=cfg.r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM", base_model_name_or_path=cfg.model)  # fmt: skip


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        logger.warning("this model has no gradient_checkpointing_enable(); training without it.")
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def _eval_all(model, tokenizer, cfg, eval_rows, eval_examples, pad_id, autocast) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if eval_examples:
        out["eval_loss"] = eval_loss(model, eval_examples, pad_id, cfg.eval_batch_size, autocast)
    gen_rows = [r for r in eval_rows if r.format != "text"]
    if cfg.eval_generate and eval_rows and not gen_rows:
        logger.info("generation eval skipped: the eval rows are 'text' rows with no completion to compare against")
    if cfg.eval_generate and gen_rows:
        g = generation_eval(model, tokenizer, gen_rows, cfg.chat_template, cfg.max_new_tokens, cfg.eval_batch_size,
                            autocast)  # fmt: skip
        out.update(g.summary())
        out["samples"] = [{"prompt": display_prompt(row), "reference": r, "prediction": x}
                          for row, r, x in list(zip(gen_rows, g.references, g.predictions))[:3]]  # fmt: skip
    return out


def _eval_loss_fn(model, examples, pad_id, batch_size, autocast):
    if not examples:
        return None
    return lambda: eval_loss(model, examples, pad_id, batch_size, autocast)


def run_training(config: TrainConfig | dict | str | None = None, *, model=None, tokenizer=None,
                 **overrides: Any) -> TrainResult:  # fmt: skip
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
        return _run(cfg, model, tokenizer)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, model, tokenizer) -> TrainResult:
    rows = read_jsonl(cfg.data, cfg.skip_bad_lines)
    if cfg.eval_data:
        eval_rows = read_jsonl(cfg.eval_data, cfg.skip_bad_lines)
    else:
        rows, eval_rows = split_train_eval(rows, cfg.eval_ratio, cfg.seed)
    out = ckpt.prepare_output_dir(cfg.output_dir, cfg.to_dict(), cfg.resume, cfg.overwrite)

    if model is None:
        model, tokenizer = _load_model(cfg.model)
    elif tokenizer is None:
        raise ValueError("run_training(model=...) also needs tokenizer=...")
    from lorakit import add_adapter, disabled, save_adapter
    from lorakit.state import adapter_state_dict, load_adapter_state_dict

    if cfg.quantize:
        from lorakit.quant import is_quantized, quantize, quantized_bytes

        if not any(is_quantized(m) for m in model.modules()):  # a caller's model may come quantized already
            quantize(model, cfg.quantize)
        logger.info("quantized the frozen base to %s: %s", cfg.quantize, quantized_bytes(model))
    torch.manual_seed(cfg.seed)
    add_adapter(model, _lora_config(cfg, model), ADAPTER)
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples, _ = tokenize_rows(rows, tokenizer, cfg.max_length, cfg.mask_prompt, cfg.chat_template)
    eval_examples = tokenize_rows(eval_rows, tokenizer, cfg.max_length, cfg.mask_prompt, cfg.chat_template)[0] \
        if eval_rows else []  # fmt: skip
    logger.info("data: %d train / %d eval examples", len(train_examples), len(eval_examples))
    logger.info(preflight.targets_summary(model, ADAPTER))
    preflight.check_round_trip(model, ADAPTER)

    device = next(model.parameters()).device
    autocast = make_autocast(cfg.precision, device)
    trainer = Trainer(
        model, train_examples, cfg, out, pad_id,
        save_adapter_fn=lambda p: save_adapter(model, p, ADAPTER),
        get_state=lambda: adapter_state_dict(model, ADAPTER),
        set_state=lambda s: load_adapter_state_dict(model, s, ADAPTER, source="checkpoint"),
        autocast=autocast,
        eval_fn=_eval_loss_fn(model, eval_examples, pad_id, cfg.eval_batch_size, autocast),
        on_first_backward=lambda: preflight.check_gradients(model, ADAPTER),
    )  # fmt: skip
    before_file = out / "eval_before.json"
    if cfg.resume and before_file.is_file():
        before = json.loads(before_file.read_text(encoding="utf-8"))
    else:
        logger.info("evaluating the base model on %d eval examples ...", len(eval_rows))
        with disabled(model):
            before = _eval_all(model, tokenizer, cfg, eval_rows, eval_examples, pad_id, autocast)
        ckpt.atomic_write_text(before_file, json.dumps(before, indent=2) + "\n")
    if cfg.resume:
        trainer.resume()  # restores the RNG state saved with the checkpoint
    else:
        torch.manual_seed(cfg.seed)  # the same stream whatever the pre-flight and base eval consumed
    logger.info("training %d steps (%d per epoch) ...", trainer.total_steps, trainer.steps_per_epoch)
    status = "interrupted"
    try:
        status = trainer.train()
    finally:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    result = TrainResult(out, status, trainer.state.step, trainer.total_steps, trainer.train_seconds,
                         trainer.last_loss, before=before)  # fmt: skip
    from lorakit import trainable_parameters

    result.trainable_params, result.total_params = trainable_parameters(model)
    if status != "completed":
        logger.warning(
            "stopped at step %d; checkpoint %s; continue with --resume.", result.steps, trainer.last_checkpoint
        )
        return result
    save_adapter(model, out, ADAPTER)
    result.adapter_bytes = sum(f.stat().st_size for f in out.glob("adapter_*") if f.is_file())
    logger.info("evaluating the adapter ...")
    result.after = _eval_all(model, tokenizer, cfg, eval_rows, eval_examples, pad_id, autocast)
    result.samples = result.after.pop("samples", [])
    result.before.pop("samples", None)
    summary = {"before": result.before, "after": result.after, "steps": result.steps,
               "train_seconds": round(result.train_seconds, 1), "adapter_bytes": result.adapter_bytes,
               "trainable_params": result.trainable_params, "samples": result.samples}  # fmt: skip
    ckpt.atomic_write_text(out / "eval_results.json", json.dumps(summary, indent=2) + "\n")
    return result
