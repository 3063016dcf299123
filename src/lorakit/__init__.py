"""lorakit: LoRA fine-tuning for PyTorch models, with PEFT-format adapters."""

from lorakit.adapters import (
    active_adapters,
    add_adapter,
    delete_adapter,
    get_config,
    list_adapters,
    print_trainable_parameters,
    route,
    set_adapter,
    set_trainable,
    trainable_parameters,
)
from lorakit.arith import combine, inspect_adapter, resize_adapter
from lorakit.config import LoraConfig
from lorakit.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    DataError,
    FormatError,
    IncompatibleAdapterError,
    LorakitError,
    MergeError,
    ModelNotFoundError,
    RoutingError,
    TargetNotFoundError,
)
from lorakit.inject import find_targets
from lorakit.io.saving import load_adapter, load_adapters, save_adapter
from lorakit.merging import disabled, merge, unload, unmerge
from lorakit.quant import quantize
from lorakit.quant_merge import merge_quantized
from lorakit.state import adapter_state_dict

__version__ = "0.1.0"

__all__ = [
    "AdapterExistsError",
    "AdapterNotFoundError",
    "ConfigError",
    "DataError",
    "FormatError",
    "IncompatibleAdapterError",
    "LoraConfig",
    "LorakitError",
    "MergeError",
    "ModelNotFoundError",
    "RoutingError",
    "TargetNotFoundError",
    "__version__",
    "active_adapters",
    "adapter_state_dict",
    "add_adapter",
    "combine",
    "delete_adapter",
    "disabled",
    "find_targets",
    "generate",
    "get_config",
    "inspect_adapter",
    "list_adapters",
    "load_adapter",
    "load_adapters",
    "load_model",
    "merge",
    "merge_quantized",
    "print_trainable_parameters",
    "quantize",
    "resize_adapter",
    "route",
    "save_adapter",
    "set_adapter",
    "set_trainable",
    "train",
    "trainable_parameters",
    "unload",
    "unmerge",
]


def load_model(name_or_path: str, **kwargs):
    """Load a model and tokenizer (see `lorakit.models.load_model`); needs the ``hf`` extra."""
    from lorakit.models import load_model as _load

    return _load(name_or_path, **kwargs)


def generate(model, tokenizer, prompts, adapters=None, **kwargs) -> list[str]:
    """Completions of ``prompts``, each with its own adapter, on the fast decode engine (see `lorakit.inference`)."""
    from lorakit.inference import generate as _generate

    return _generate(model, tokenizer, prompts, adapters, **kwargs)


def train(config=None, **overrides):
    """Run a whole training job (see `lorakit.training.run_training`); ``lorakit train`` on the command line.

    Args:
        config: A `lorakit.training.TrainConfig`, a path to a YAML file of its keys, or None.
        **overrides: TrainConfig fields that replace the config's (e.g. ``max_steps=40``).

    Returns:
        The `lorakit.training.TrainResult` (status, steps, metrics, where the adapter was written).
    """
    from lorakit.training import run_training

    return run_training(config, **overrides)
