"""DoRA (use_dora=True) against the real `peft`: init, logits, gradients, merge, files both ways (fp32, 1e-4)."""

from __future__ import annotations

import copy

import pytest
import torch
from dora_reference import peft_dora, perturb
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers import iter_lora_layers
from lorakit.layers.dora import row_norm

ATOL = 1e-4
DORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True)


def _ids(shape=(2, 10)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(3))


def _peft_dora(base: nn.Module, **overrides) -> nn.Module:
    return peft_dora(base, {**DORA, **overrides})


def test_row_norm_equals_the_dense_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(12, 9, generator=gen), torch.randn(3, 9, generator=gen), torch.randn(12, 3, generator=gen)
    torch.testing.assert_close(row_norm(w, a, b, 0.7), torch.linalg.norm(w + 0.7 * b @ a, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(row_norm(w.T, a, b, 0.7, fan_in_fan_out=True), row_norm(w, a, b, 0.7))


def test_fresh_dora_adapter_has_peft_magnitude_and_is_a_no_op(tiny_llama) -> None:
    ids = _ids()
    before = tiny_llama(ids).logits
    torch.manual_seed(7)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), PeftLoraConfig(**DORA))
    torch.manual_seed(7)
    lorakit.add_adapter(tiny_llama, LoraConfig(**DORA))
    theirs = {n.replace("base_model.model.", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    ours = lorakit.adapter_state_dict(tiny_llama, "default")
    assert len(ours) == len(theirs) == 18
    for key, value in ours.items():
        ref = theirs[key + ".weight" if key.endswith("magnitude_vector.default") else key]
        torch.testing.assert_close(value, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny_llama(ids).logits, before, atol=1e-5, rtol=0)


def _both_ways(base: nn.Module, peft_model: nn.Module, tmp_path) -> nn.Module:
    """PEFT's saved adapter loads into a copy of ``base`` with PEFT's logits, and ours loads back into PEFT."""
    ids = _ids()
    theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "theirs")
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "theirs")
    torch.testing.assert_close(ours(ids).logits, theirs, atol=ATOL, rtol=0)
    assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-2  # the adapter does change the outputs
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(again(ids).logits, theirs, atol=ATOL, rtol=0)
    return ours


def test_peft_dora_adapter_loads_with_same_logits_and_saves_back(tiny_llama, tmp_path) -> None:
    ours = _both_ways(tiny_llama, _peft_dora(tiny_llama), tmp_path)
    assert lorakit.get_config(ours).use_dora is True


def test_gradients_equal_peft(tiny_llama) -> None:
    peft_model = _peft_dora(tiny_llama)
    ours = copy.deepcopy(tiny_llama)
    lorakit.add_adapter(ours, LoraConfig(**DORA))
    state = {k.replace("base_model.model.", "").replace(".weight", ""): p for k, p in peft_model.state_dict().items()}
    with torch.no_grad():
        for key, p in lorakit.adapter_state_dict(ours, "default").items():
            p.copy_(state[key.replace(".weight", "")])
    ids = _ids()
    peft_model(ids, labels=ids).loss.backward()
    ours.train()
    ours(ids, labels=ids).loss.backward()
    theirs = {k.replace("base_model.model.", ""): p.grad for k, p in peft_model.named_parameters() if "lora_" in k}
    for key, p in lorakit.adapter_state_dict(ours, "default").items():
        ref = theirs[key + ".weight" if key.endswith("magnitude_vector.default") else key]
        assert ref is not None and p.grad is not None, key
        torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4)


def test_merge_matches_peft_and_unmerge_restores_the_base(tiny_llama, tmp_path) -> None:
    peft_model = _peft_dora(tiny_llama)
    peft_model.save_pretrained(tmp_path)
    ours = copy.deepcopy(tiny_llama)
    lorakit.load_adapter(ours, tmp_path)
    ids = _ids()
    unmerged = ours(ids).logits
    original = {n: p.detach().clone() for n, p in ours.named_parameters()}
    lorakit.merge(ours)
    torch.testing.assert_close(ours(ids).logits, unmerged, atol=ATOL, rtol=0)
    merged_ref = peft_model.merge_and_unload().state_dict()
    for path, layer in iter_lora_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, merged_ref[f"{path}.weight"], atol=1e-5, rtol=0)
    lorakit.unmerge(ours)
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, original[n], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(ids).logits, unmerged, atol=ATOL, rtol=0)


def test_gpt2_conv1d_dora_equals_peft(tmp_path) -> None:
    from tests.tiny_models import tiny_gpt2

    base = tiny_gpt2()
    peft_model = _peft_dora(base, target_modules=["c_attn", "c_proj"])
    ids = _ids()
    peft_model.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path)
    torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=ATOL, rtol=0)
    unmerged = ours(ids).logits
    lorakit.merge(ours)
    torch.testing.assert_close(ours(ids).logits, unmerged, atol=ATOL, rtol=0)


def test_dora_and_lora_rows_mix_in_one_routed_batch(tiny_llama) -> None:
    lorakit.add_adapter(tiny_llama, LoraConfig(**DORA), name="dora")
    lorakit.add_adapter(tiny_llama, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]), name="plain")
    perturb(lorakit.adapter_state_dict(tiny_llama, "dora").items(), seed=4)
    perturb(lorakit.adapter_state_dict(tiny_llama, "plain").items(), seed=5)
    ids = _ids((3, 8))
    rows = ["dora", None, "plain"]
    with torch.no_grad(), lorakit.route(tiny_llama, rows):
        mixed = tiny_llama(ids).logits
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disabled(tiny_llama), torch.no_grad():
                alone = tiny_llama(ids[i : i + 1]).logits
        else:
            lorakit.set_adapter(tiny_llama, name)
            with torch.no_grad():
                alone = tiny_llama(ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL, rtol=0)
    # and with autograd on (routed training): the DoRA rows give the magnitude a gradient
    lorakit.set_trainable(tiny_llama, ["dora", "plain"])
    with lorakit.route(tiny_llama, rows):
        tiny_llama(ids, labels=ids).loss.backward()
    mags = [p for k, p in lorakit.adapter_state_dict(tiny_llama, "dora").items() if "magnitude" in k]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mags)


def test_dora_on_the_nf4_base_equals_dora_on_the_dequantized_base(tiny_llama) -> None:
    from lorakit.quant import dequantized_weight

    quantized = lorakit.quantize(copy.deepcopy(tiny_llama))
    dense = copy.deepcopy(tiny_llama)
    with torch.no_grad():  # the dense reference holds exactly the NF4 weights
        for name, module in quantized.named_modules():
            if hasattr(module, "dequantized_weight"):
                dense.get_submodule(name).weight.copy_(dequantized_weight(module))
    for model in (quantized, dense):
        torch.manual_seed(3)
        lorakit.add_adapter(model, LoraConfig(**DORA))
    perturb(lorakit.adapter_state_dict(dense, "default").items(), seed=8)
    perturb(lorakit.adapter_state_dict(quantized, "default").items(), seed=8)
    ids = _ids()
    torch.testing.assert_close(quantized(ids).logits, dense(ids).logits, atol=ATOL, rtol=0)
    quantized.train()
    quantized(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in lorakit.adapter_state_dict(quantized, "default").values())


def test_merge_quantized_applies_the_dora_formula(tiny_llama) -> None:
    model = lorakit.quantize(copy.deepcopy(tiny_llama))
    lorakit.add_adapter(model, LoraConfig(**DORA))
    perturb(lorakit.adapter_state_dict(model, "default").items(), seed=6)
    ids = _ids()
    expected = model(ids).logits
    merged, _ = lorakit.merge_quantized(model, mode="dequant")
    torch.testing.assert_close(merged(ids).logits, expected, atol=ATOL, rtol=0)


def test_train_flags_reach_the_lora_config() -> None:
    import argparse

    from lorakit.cli.options import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--use-dora", "--use-rslora", "--init-lora-weights", "pissa_niter_4"])
    cfg = config_from_args(args)
    assert (cfg.use_dora, cfg.use_rslora, cfg.init_lora_weights) == (True, True, "pissa_niter_4")
    assert config_from_args(parser.parse_args(["--init-lora-weights", "false"])).init_lora_weights is False
    with pytest.raises(ConfigError, match="pissa_niter_<iterations>"):
        config_from_args(parser.parse_args(["--init-lora-weights", "pissa_niter_x"]))


def test_dora_on_the_embedding_of_a_llama_equals_peft_both_ways(tiny_llama, tmp_path) -> None:
    """DoRA on embed_tokens (was refused) next to q_proj: PEFT's adapter loads here, ours loads in PEFT."""
    ours = _both_ways(tiny_llama, _peft_dora(tiny_llama, target_modules=["embed_tokens", "q_proj"]), tmp_path)
    magnitude = ours.model.embed_tokens.lora_magnitude_vector["default"]
    assert magnitude.shape == (tiny_llama.config.hidden_size,)  # one per embedding dimension, as PEFT


def test_default_model_dora_logits_equal_peft_both_ways(default_model, default_model_dir, tmp_path) -> None:
    """The embedded SmolLM2-135M-Instruct with DoRA on q/k/v/o: PEFT's adapter here, ours in PEFT."""
    from lorakit.models import load_model

    model, tokenizer = default_model
    ids = tokenizer(["Turn this into JSON: Alice, 31, Paris."], return_tensors="pt").input_ids
    cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True)
    peft_model = get_peft_model(load_model(default_model_dir)[0], PeftLoraConfig(**cfg)).eval()
    # trained-adapter sized changes (30 layers amplify rounding differences of a wildly perturbed model)
    perturb([(n, p) for n, p in peft_model.named_parameters() if "lora_" in n], seed=9, scale=0.02)
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "theirs")
    lorakit.load_adapter(model, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs, atol=ATOL, rtol=0)
    lorakit.save_adapter(model, tmp_path / "ours")
    again = PeftModel.from_pretrained(load_model(default_model_dir)[0], tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs, atol=ATOL, rtol=0)


def test_trainer_preflight_round_trip_accepts_dora(tiny_llama) -> None:
    """The trainer's save/load check maps DoRA's key (adapter name last: lora_magnitude_vector.<name>)."""
    from lorakit.training import preflight

    lorakit.add_adapter(tiny_llama, LoraConfig(**DORA))
    preflight.check_round_trip(tiny_llama, "default")  # raised PreflightError for every magnitude before the fix
