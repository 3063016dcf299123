"""The one QLoRA check on the real default model (SmolLM2-135M-Instruct): storage and fidelity of NF4."""

from __future__ import annotations

import torch

from lorakit.quant import quantize, quantized_bytes


def test_default_model_nf4_is_under_0_15x_fp32_and_keeps_most_top1_tokens(default_model):
    model, tokenizer = default_model
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        quantize(model, "nf4", double_quant=True)
        after = model(ids).logits
    info = quantized_bytes(model)
    assert info["layers"] == 30 * 7 and info["ratio"] <= 0.15  # 4.127 bits per weight of 32: ~0.129
    assert model.lm_head.weight.dtype == torch.float32  # embeddings / head untouched
    agree = (after.argmax(-1) == before.argmax(-1)).float().mean().item()
    assert agree >= 0.7, agree
