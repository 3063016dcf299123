"""Model-level merge and unload: explicit, all or nothing, never into tied weights; unload gives plain modules."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig, MergeError
from lorakit.layers import LoraLayer, ModulesToSave

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
RANDOM = dict(init_lora_weights=False)  # adapters that change the output, so the checks below mean something


# ---- merge is explicit ---------------------------------------------------------------------------------------
def test_nothing_merges_inside_train_eval_or_forward():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules="all-linear", **RANDOM))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(IDS)
    model.eval()
    logits(model, IDS)
    model.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("verb", [lorakit.merge, lorakit.unload])
def test_merging_into_tied_embeddings_is_refused_and_changes_nothing(verb):
    model = tiny_gpt2()  # lm_head.weight is transformer.wte.weight
    lorakit.add_adapter(model, LoraConfig(target_modules=["lm_head", "c_attn"], **RANDOM))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = logits(model, IDS)
    with pytest.raises(MergeError, match=r"lm_head.*transformer\.wte\.weight"):
        verb(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model, IDS), adapted)
    assert lorakit.list_adapters(model) == ["default"]


@pytest.mark.parametrize("verb", [lorakit.merge, lorakit.unload])
def test_failed_merge_names_the_layer_and_leaves_nothing_half_merged(verb):
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=ATTN, **RANDOM))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(MergeError, match=r"model\.layers\.1\.self_attn\.o_proj.*non-finite"):
        verb(model)
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))
    assert sum(1 for m in model.modules() if isinstance(m, LoraLayer)) == 8  # unload did not start replacing
    for n, p in model.named_parameters():
        if "lora_" not in n:
            torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6)


# ---- unload --------------------------------------------------------------------------------------------------
def test_unload_with_merge_gives_plain_linear_layers_and_the_same_logits():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules="all-linear", **RANDOM))
    adapted = logits(model, IDS)
    assert lorakit.unload(model, merge=True) is model
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert "_lorakit" not in model.__dict__
    torch.testing.assert_close(logits(model, IDS), adapted, rtol=1e-4, atol=1e-4)


def test_unload_without_merge_gives_the_original_logits():
    model = tiny_llama()
    base = logits(model, IDS)
    lorakit.add_adapter(model, LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"], **RANDOM))
    lorakit.merge(model)
    lorakit.unload(model, merge=False)
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(logits(model, IDS), base, rtol=1e-5, atol=1e-5)


def test_unload_with_merge_keeps_the_trained_modules_to_save_copy():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.5)
    adapted = logits(model, IDS)
    lorakit.unload(model)
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(logits(model, IDS), adapted)
