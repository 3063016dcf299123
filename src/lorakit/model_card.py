"""The model card (``README.md``) lorakit writes into every adapter folder, with the Hub's YAML front matter.

The Hub reads ``base_model`` (links the adapter to its base and lists it under the base's "Adapters"),
``library_name: peft`` (the "Use this model" snippets) and ``tags``. The body says what the adapter is
(config, size), how it was trained (data, steps, the eval table) when the trainer knows, and how to load it
with lorakit, PEFT, transformers, vLLM and llama.cpp.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CARD_MARKER", "CardInfo", "is_lorakit_card", "render_card", "update_card"]

CARD_MARKER = "<!-- lorakit model card: rewritten on every save; remove this line to keep your own README -->"


@dataclass(frozen=True)
class CardInfo:
    """What only the caller knows about an adapter: how it was trained and how well it does.

    Attributes:
        training: settings shown in the "Training" table (e.g. data, steps, learning_rate, batch_size, seed).
        eval_table: a Markdown table of evaluation results (base vs adapter), shown as is.
        title: the card's heading (default: the folder name).
    """

    training: Mapping[str, Any] = field(default_factory=dict)
    eval_table: str | None = None
    title: str | None = None


def is_lorakit_card(path: Path) -> bool:
    """True if ``path`` is absent or a card lorakit wrote (so it may be replaced); a user's README is kept."""
    if not path.is_file():
        return True
    try:
        return CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _is_hub_id(name: str | None) -> bool:
    from lorakit.hub import is_hub_id  # only the pattern; no huggingface_hub import

    return bool(name) and is_hub_id(name) and not Path(name).exists()


def _front_matter(base: str | None) -> str:
    tags = ["lora", "peft", "lorakit", "text-generation"]
    lines = ["---"]
    if _is_hub_id(base):
        lines.append(f"base_model: {base}")
        tags.insert(0, f"base_model:adapter:{base}")
    lines += ["library_name: peft", "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---"]
    return "\n".join(lines)


def _targets(config: Mapping[str, Any]) -> str:
    value = config.get("target_modules")
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _adapter_table(config: Mapping[str, Any], size_bytes: int, params: int | None) -> str:
    rows = [
        (
            "base model",
            f"`{config.get('base_model_name_or_path')}`"
            + (f" at revision `{config['revision']}`" if config.get("revision") else ""),
        ),  # fmt: skip
        ("r / lora_alpha", f"{config.get('r')} / {config.get('lora_alpha')}"),
        ("lora_dropout", config.get("lora_dropout")),
        ("target_modules", _targets(config)),
        ("rsLoRA", config.get("use_rslora", False)),
        ("adapter file size", f"{size_bytes:,d} bytes ({size_bytes / 1e6:.2f} MB)"),
    ]
    if params is not None:
        rows.insert(-1, ("trainable parameters", f"{params:,d}"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _usage(base: str, name: str, r: Any) -> str:
    return f"""```python
# lorakit
import lorakit
model, tokenizer = lorakit.load_model("{base}")
lorakit.load_adapter(model, "{name}")          # a folder or a Hub id

# PEFT (finds the base model through base_model_name_or_path)
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("{name}")

# transformers (with peft installed)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{base}")
model.load_adapter("{name}")
```

```bash
# vLLM: serve the base with this adapter as model "{Path(name).name}"
vllm serve {base} --enable-lora --max-lora-rank {r} --lora-modules {Path(name).name}={name}
# llama.cpp: convert the adapter to GGUF (the base comes from base_model_name_or_path), then apply it
python convert_lora_to_gguf.py {name} --outfile {Path(name).name}-lora.gguf
llama-cli -m base-model.gguf --lora {Path(name).name}-lora.gguf
```"""


def render_card(
    config: Mapping[str, Any],
    size_bytes: int,
    *,
    trainable_params: int | None = None,
    info: CardInfo | None = None,
    location: str | None = None,
) -> str:
    """The README.md text for an adapter.

    Args:
        config: the adapter's ``adapter_config.json`` dict (PEFT field names).
        size_bytes: size of ``adapter_model.safetensors``.
        trainable_params: the adapter's parameter count, if known.
        info: training settings and the eval table, if known.
        location: how to name the adapter in the usage snippets (a folder or Hub id; default the title).
    """
    info = info or CardInfo()
    base = str(config.get("base_model_name_or_path") or "BASE_MODEL")
    title = info.title or "LoRA adapter"
    name = location or title
    parts = [
        _front_matter(config.get("base_model_name_or_path")),
        CARD_MARKER,
        f"# {title}\n\nA LoRA adapter (PEFT format: `adapter_config.json` + `adapter_model.safetensors`) for "
        f"`{base}`, written by [lorakit](https://github.com/lorakit/lorakit).",
        "## Adapter\n\n" + _adapter_table(config, size_bytes, trainable_params),
    ]
    if info.training:
        rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in info.training.items())
        parts.append("## Training\n\n| setting | value |\n|---|---|\n" + rows)
    if info.eval_table:
        parts.append("## Evaluation\n\n" + info.eval_table.strip())
    parts.append("## How to load it\n\n" + _usage(base, name, config.get("r")))
    return "\n\n".join(parts) + "\n"


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|")


def update_card(folder: str | Path, info: CardInfo, trainable_params: int | None = None) -> bool:
    """Rewrites the model card of the adapter in ``folder`` (atomically) with ``info``.

    Returns False (and writes nothing) when the folder's README.md is the user's own, not lorakit's.
    """
    from lorakit.io.atomic import atomic_write_bytes
    from lorakit.io.peft_format import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(folder)
    if not is_lorakit_card(folder / "README.md"):
        return False
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    size = (folder / WEIGHTS_NAME).stat().st_size
    text = render_card(config, size, trainable_params=trainable_params, info=info)
    atomic_write_bytes(folder / "README.md", text.encode())
    return True
