"""PiSSA / OLoRA / LoftQ through the whole product, against the real `peft`: init, save as plain LoRA, load."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers import LoraQuantLinear, iter_lora_layers

ATOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def _train_a_little(params, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_init_equals_peft_and_keeps_the_outputs(tiny_llama, init: str) -> None:
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    ids = _ids()
    before = tiny_llama(ids).logits
    torch.manual_seed(11)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), PeftLoraConfig(**cfg))
    torch.manual_seed(11)
    lorakit.add_adapter(tiny_llama, LoraConfig(**cfg))
    theirs = {k.replace("base_model.model.", ""): v for k, v in peft_model.state_dict().items()}
    for path, layer in iter_lora_layers(tiny_llama):
        for key, value in {**layer.adapter_tensors("default"), "base_layer.weight": layer.base_layer.weight}.items():
            torch.testing.assert_close(value, theirs[f"{path}.{key}"], atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny_llama(ids).logits, before, atol=ATOL, rtol=0)  # W_res + s B0 A0 = W


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_convert_to_lora_loads_on_the_unmodified_base_here_and_in_peft(tiny_llama, tmp_path, init: str) -> None:
    original = copy.deepcopy(tiny_llama)
    lorakit.add_adapter(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    _train_a_little(lorakit.adapter_state_dict(tiny_llama, "default").values())
    ids = _ids()
    trained = tiny_llama(ids).logits
    assert (trained - original(ids).logits).abs().max() > 1e-2
    lorakit.save_adapter(tiny_llama, tmp_path, convert_to_lora=True)

    plain = lorakit.LoraConfig.from_dict(__import__("json").loads((tmp_path / "adapter_config.json").read_text()))
    assert (plain.r, plain.lora_alpha, plain.init_lora_weights) == (8, 16, True)
    ours = copy.deepcopy(original)
    lorakit.load_adapter(ours, tmp_path)
    torch.testing.assert_close(ours(ids).logits, trained, atol=ATOL, rtol=0)
    theirs = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    torch.testing.assert_close(theirs(ids).logits, trained, atol=ATOL, rtol=0)


def test_convert_to_lora_writes_what_peft_writes(tiny_llama, tmp_path) -> None:
    """PEFT's path_initial_model_for_weight_conversion on the same OLoRA run gives the same tensors."""
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora")
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), PeftLoraConfig(**cfg))
    peft_model.save_pretrained(tmp_path / "init")
    _train_a_little([p for n, p in peft_model.named_parameters() if "lora_" in n])
    peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    lorakit.add_adapter(tiny_llama, LoraConfig(**cfg))
    _train_a_little(lorakit.adapter_state_dict(tiny_llama, "default").values())
    lorakit.save_adapter(tiny_llama, tmp_path / "ours", convert_to_lora=True)
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=ATOL, rtol=0)


def test_loading_a_pissa_adapter_never_rewrites_the_base(tiny_llama, tmp_path) -> None:
    lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    lorakit.save_adapter(tiny_llama, tmp_path)  # unconverted: fits this residual base
    weights = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if "base_layer" in n}
    ids = _ids()
    expected = tiny_llama(ids).logits
    lorakit.delete_adapter(tiny_llama, "default")
    lorakit.load_adapter(tiny_llama, tmp_path)
    for n, p in tiny_llama.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=0, rtol=0)
    torch.testing.assert_close(tiny_llama(ids).logits, expected, atol=ATOL, rtol=0)


def test_loftq_puts_an_nf4_base_under_factors_that_absorb_its_error(tiny_llama) -> None:
    from lorakit.ops.inits import loftq_factors

    ids = _ids()
    reference = tiny_llama(ids).logits
    plain = lorakit.quantize(copy.deepcopy(tiny_llama), double_quant=False)
    plain_error = (plain(ids).logits - reference).abs().mean()
    weight = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
                     loftq_config={"loftq_bits": 4, "loftq_iter": 2})  # fmt: skip
    lorakit.add_adapter(tiny_llama, cfg)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantLinear)
    a, b, q = loftq_factors(weight, 8, num_iter=2)
    torch.testing.assert_close(layer.base_layer.dequantized_weight(), q, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight, a, atol=1e-6, rtol=0)
    assert (tiny_llama(ids).logits - reference).abs().mean() < 0.8 * plain_error


def test_loftq_model_equals_peft_init_lora_weights_loftq(tiny_llama, monkeypatch) -> None:
    """PEFT's get_peft_model(init_lora_weights="loftq") with its loftq_init run on the CPU: same Q, A, B, logits."""
    from peft import LoftQConfig
    from peft.tuners.lora import layer as peft_lora_layer

    from tests.peft_loftq_cpu import peft_loftq_init_on_cpu

    monkeypatch.setattr(peft_lora_layer, "loftq_init", peft_loftq_init_on_cpu())
    cfg = dict(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq")
    peft_model = get_peft_model(
        copy.deepcopy(tiny_llama), PeftLoraConfig(**cfg, loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2))
    ).eval()
    lorakit.add_adapter(tiny_llama, LoraConfig(**cfg, loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    theirs = dict(peft_model.base_model.model.named_modules())
    for path, layer in iter_lora_layers(tiny_llama):
        ref = theirs[path]
        torch.testing.assert_close(layer.base_layer.dequantized_weight(), ref.base_layer.weight, atol=ATOL, rtol=0)
        for factor in ("lora_A", "lora_B"):
            ours_w, ref_w = getattr(layer, factor)["default"].weight, getattr(ref, factor)["default"].weight
            torch.testing.assert_close(ours_w, ref_w, atol=ATOL, rtol=0)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, peft_model(ids).logits, atol=ATOL, rtol=0)


def test_config_accepts_the_variants_and_explains_bad_values() -> None:
    for init in ("pissa", "pissa_niter_4", "olora", "loftq"):
        cfg = LoraConfig(init_lora_weights=init, use_dora=True)
        assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="pissa_niter_<iterations>"):
        LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ConfigError, match="does not implement"):
        LoraConfig(init_lora_weights="eva")
    with pytest.raises(ConfigError, match="loftq_bits"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8})


def test_convert_to_lora_is_refused_for_other_adapters(tiny_llama, tmp_path) -> None:
    lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="pissa"):
        lorakit.save_adapter(tiny_llama, tmp_path, convert_to_lora=True)
