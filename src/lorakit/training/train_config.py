"""TrainConfig: every knob of a training run, validated once; YAML files and flags map onto its fields.

Precedence: dataclass defaults < YAML file (``--config``) < command-line flags. Keys are the field names
(``learning_rate``); flags are the same with dashes (``--learning-rate``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults are what the main job uses (see ``examples/``)."""

    data: str | None = None
    output_dir: str | None = None
    model: str = DEFAULT_MODEL  # embedded name, Hub id (Org/Name), HF folder or .gguf file
    revision: str | None = None  # Hub branch, tag or commit of a Hub id model
    dtype: str = "fp32"  # base weights: fp32 | bf16 | fp16 | auto (the checkpoint's dtype on CUDA, fp32 on CPU)
    eval_data: str | None = None
    eval_ratio: float = 0.1  # held out from ``data`` when no ``eval_data`` is given
    # LoRA
    r: int = 16
    lora_alpha: float | None = None  # None: 2 * r (32 at the default r=16)
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | str | None = None  # None: PEFT's default for the architecture
    use_rslora: bool = False  # scaling alpha / sqrt(r)
    use_dora: bool = False  # DoRA: learned magnitude x normalised W + sBA
    init_lora_weights: bool | str = True  # or gaussian | pissa | pissa_niter_K | olora | loftq (see LoraConfig)
    # optimization
    learning_rate: float = 2e-3
    loraplus_lr_ratio: float | None = None  # LoRA+: lr of B = ratio * lr of A
    weight_decay: float = 0.0
    batch_size: int = 8  # rows per micro-batch per process
    global_batch_size: int | None = None  # rows per optimizer step over all processes; sets batch_size from it
    gradient_accumulation_steps: int = 1
    num_epochs: float = 3.0
    max_steps: int | None = None  # overrides num_epochs
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float | None = 1.0
    seed: int = 42
    # data
    max_length: int = 256
    mask_prompt: bool = True  # loss only on completions / assistant turns
    chat_template: bool = True  # render prompt/completion rows as chat turns when the tokenizer has a template
    group_by_length: bool = True
    skip_bad_lines: bool = False
    # data sources, formats, packing, trackers (lorakit.training.sources / formats / packing / trackers)
    data_split: str = "train"  # split of a hub dataset or a saved DatasetDict
    data_config: str | None = None  # configuration (subset) of a hub dataset
    eval_data_split: str | None = None  # split of ``eval_data`` (default: data_split)
    format: str = "auto"  # auto | text | prompt_completion | messages | alpaca | sharegpt
    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    messages_column: str | None = None
    packing: bool = False  # several examples per max_length row, attention confined to each
    report_to: str | None = None  # comma-separated: tensorboard, mlflow, wandb
    # runtime
    gradient_checkpointing: bool = False
    quantize: str | None = None  # "nf4": QLoRA, a 4-bit frozen base under full-precision adapters
    precision: str = "auto"  # auto (bf16 autocast where supported) | bf16 | fp32
    num_threads: int | None = None
    save_steps: int = 50
    save_total_limit: int = 2
    eval_steps: int | None = None
    logging_steps: int = 5
    eval_generate: bool = True  # greedy-generation exact match before and after training
    eval_batch_size: int = 16
    max_new_tokens: int | None = None  # default: longest reference answer + 16 tokens
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    # multi-process (torchrun); ignored in a single process
    fsdp: bool = False  # FSDP2: shard the frozen base and the adapter across processes (default: replicate)
    dist_timeout: int = 600  # seconds a collective may wait for another process before the run fails

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = []
        for name in ("learning_rate", "num_epochs"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name}={value!r} (expected a positive number)")
        for name in (
            "r",
            "batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "save_steps",
            "logging_steps",
            "eval_batch_size",
            "save_total_limit",
            "dist_timeout",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name}={value!r} (expected a positive integer)")
        for name in ("max_steps", "eval_steps", "max_new_tokens", "num_threads", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                problems.append(f"{name}={value!r} (expected a positive integer or unset)")
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha <= 0):
            problems.append(f"lora_alpha={self.lora_alpha!r} (expected a positive number, or unset for 2 * r)")
        if self.loraplus_lr_ratio is not None and (
            not _is_number(self.loraplus_lr_ratio) or self.loraplus_lr_ratio <= 0
        ):
            problems.append(f"loraplus_lr_ratio={self.loraplus_lr_ratio!r} (expected a positive number or unset)")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout={self.lora_dropout!r} (expected 0 <= p < 1)")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio!r} (expected 0 <= ratio < 1)")
        if not 0 <= self.eval_ratio < 1:
            problems.append(f"eval_ratio={self.eval_ratio!r} (expected 0 <= ratio < 1)")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            problems.append(f"lr_scheduler={self.lr_scheduler!r} (expected cosine, linear or constant)")
        if self.quantize not in (None, "nf4"):
            problems.append(f"quantize={self.quantize!r} (expected nf4, or unset for a full-precision base)")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"dtype={self.dtype!r} (expected auto, bf16, fp16 or fp32)")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision={self.precision!r} (expected auto, bf16 or fp32)")
        try:  # the LoRA fields are LoraConfig's: its checks, its messages
            from lorakit.config import LoraConfig

            LoraConfig(use_rslora=self.use_rslora, use_dora=self.use_dora, init_lora_weights=self.init_lora_weights)
        except ConfigError as e:
            problems.append(str(e).removeprefix("Invalid LoraConfig: ").rstrip("."))
        if self.resume and self.overwrite:
            problems.append("resume=True with overwrite=True (pick one: continue the run or start over)")
        problems += _data_problems(self)
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems) + ".")

    def require_paths(self) -> None:
        """Raise unless the fields a run needs (``data``, ``output_dir``) are set."""
        missing = [f"--{n.replace('_', '-')}" for n in ("data", "output_dir") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"training needs {' and '.join(missing)} (on the command line or in --config FILE).")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrainConfig:
        """Build from a mapping, naming unknown keys (with close matches) in the error."""
        known = {f.name for f in fields(cls)}
        d = {k: _coerce_number(v) if k in _NUMERIC else v for k, v in d.items()}
        unknown = [k for k in d if k not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            raise ConfigError(
                f"{where}: unknown keys {unknown}; did you mean {[h[0] for h in hints.values() if h]}? "
                f"Known keys: {sorted(known)}."
            )
        return cls(**d)


_NUMERIC = frozenset(
    {
        "eval_ratio",
        "r",
        "lora_alpha",
        "lora_dropout",
        "learning_rate",
        "loraplus_lr_ratio",
        "weight_decay",
        "batch_size",
        "gradient_accumulation_steps",
        "num_epochs",
        "max_steps",
        "warmup_ratio",
        "max_grad_norm",
        "seed",
        "max_length",
        "num_threads",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "logging_steps",
        "eval_batch_size",
        "max_new_tokens",
        "global_batch_size",
        "dist_timeout",
    }
)


def _data_problems(cfg: TrainConfig) -> list[str]:
    from lorakit.training.formats import FORMAT_CHOICES
    from lorakit.training.trackers import parse_report_to

    problems = []
    if cfg.format not in FORMAT_CHOICES:
        problems.append(f"format={cfg.format!r} (expected one of {', '.join(FORMAT_CHOICES)})")
    try:
        parse_report_to(cfg.report_to)
    except ConfigError as e:
        problems.append(str(e).rstrip("."))
    return problems


def _coerce_number(v: Any) -> Any:
    """``"1e-3"`` -> 0.001 (YAML 1.1 reads exponent floats without a dot as strings); others unchanged."""
    if not isinstance(v, str):
        return v
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and re.fullmatch(r"[+-]?\d+", v.strip()) else f


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (keys may use dashes or underscores)."""
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("reading a YAML config needs PyYAML: pip install 'lorakit[hf]'") from e
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist.")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, got {type(d).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def build_config(file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < YAML ``file`` < ``overrides`` whose value is not None."""
    d = load_yaml(file) if file else {}
    d.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(d, where=str(file) if file else "config")
