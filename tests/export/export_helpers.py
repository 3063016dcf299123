"""Hand-made adapter folders (PEFT format) for the export and runtime-check tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.export import BaseInfo
from lorakit.io.atomic import write_adapter_dir

LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTN = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
MLP = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def tiny_llama_base(n_layer: int = 2, tensor_names: frozenset[str] | None = None) -> BaseInfo:
    """The GGUF facts of a 2-layer Llama (4 heads, 2 KV heads), tied output head, no GGUF file."""
    return BaseInfo("llama", n_layer, 4, 2, tensor_names, tied_output=True)


def module_path(leaf: str, layer: int) -> str:
    if leaf in ("embed_tokens",):
        return "model.embed_tokens"
    if leaf == "lm_head":
        return "lm_head"
    return f"model.layers.{layer}.{ATTN.get(leaf) or MLP.get(leaf, 'self_attn')}.{leaf}"


def write_adapter(
    folder: Path,
    targets: tuple[str, ...] = LLAMA_MODULES,
    r: int = 4,
    layers: tuple[int, ...] = (0, 1),
    ranks: dict[str, int] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    **config,
) -> Path:
    """Writes a PEFT-format adapter with random factors (hidden 32, KV width 16) and returns its folder."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = dict(extra or {})
    width = {"k_proj": 16, "v_proj": 16, "gate_proj": 64, "up_proj": 64}
    for leaf in targets:
        for layer in layers if leaf not in ("embed_tokens", "lm_head") else (0,):
            path = module_path(leaf, layer)
            rank = (ranks or {}).get(leaf, r)
            out, inp = width.get(leaf, 32), 64 if leaf == "down_proj" else 32
            key = f"base_model.model.{path}"
            if leaf == "embed_tokens":
                tensors[f"{key}.lora_embedding_A"] = torch.randn(rank, 128, generator=gen)
                tensors[f"{key}.lora_embedding_B"] = torch.randn(32, rank, generator=gen)
                continue
            out = 128 if leaf == "lm_head" else out
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none"}
    cfg.update({"base_model_name_or_path": "tiny-llama", **config})
    write_adapter_dir(folder, cfg, tensors)
    return folder


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids of a user turn rendered with the chat template, ready for the assistant's answer."""
    turn = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer) -> set[int]:
    vocab = tokenizer.get_vocab()
    return {tokenizer.eos_token_id} | ({vocab["<|im_end|>"]} if "<|im_end|>" in vocab else set())


def train_quickly(model, tokenizer, rows: list[dict], steps: int, lr: float = 2e-3, batch: int = 8) -> list[float]:
    """A few AdamW steps on prompt/completion rows (loss on the completion only); returns the losses.

    Deliberately small and self-contained: the export tests need an adapter that changes what the model
    generates, not lorakit's trainer.
    """
    end = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token
    examples = []
    for row in rows:
        prompt = chat_prompt_ids(tokenizer, row["prompt"])
        answer = tokenizer(row["completion"] + end, add_special_tokens=False)["input_ids"]
        examples.append((prompt + answer, [-100] * len(prompt) + answer))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in chunk])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def patterned_copy(src: Path, dst: Path) -> Path:
    """The same trained adapter re-expressed with rsLoRA, a rank_pattern and an alpha_pattern.

    ``o_proj`` factors are zero-padded from r to r + 4 (``rank_pattern``); alphas are chosen so that every
    module keeps its trained scale except ``v_proj``, whose update becomes 1.5x larger (``alpha_pattern``). An
    export that lost any of the three would scale updates by a different factor (0.35x for rsLoRA alone).
    """
    import math

    from lorakit.io.atomic import read_adapter_dir

    config, tensors = read_adapter_dir(src)
    r, scale = int(config["r"]), config["lora_alpha"] / config["r"]
    padded = r + 4
    for key in list(tensors):
        if ".o_proj.lora_A" in key:
            tensors[key] = torch.nn.functional.pad(tensors[key], (0, 0, 0, padded - r))
        elif ".o_proj.lora_B" in key:
            tensors[key] = torch.nn.functional.pad(tensors[key], (0, padded - r))
    config.update(
        use_rslora=True,
        lora_alpha=scale * math.sqrt(r),
        rank_pattern={"o_proj": padded},
        alpha_pattern={"o_proj": scale * math.sqrt(padded), "v_proj": 1.5 * scale * math.sqrt(r)},
    )
    write_adapter_dir(dst, config, tensors)
    return dst
