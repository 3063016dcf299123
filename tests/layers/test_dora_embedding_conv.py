"""DoRA on nn.Embedding and nn.Conv1d/2d/3d against the real `peft`: init, outputs, gradients, merge, files."""

from __future__ import annotations

import copy

import pytest
import torch
from dora_reference import peft_dora, perturb
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.layers import iter_lora_layers

ATOL = 1e-4
TARGETS = ["emb", "conv1", "conv2", "conv3"]
DORA = dict(r=3, lora_alpha=6, target_modules=TARGETS, use_dora=True)
# PEFT's magnitude shapes: (dim,) for an embedding, (1, out, 1, ...) for a conv
MAGNITUDE_SHAPES = {"emb": (8,), "conv1": (1, 12, 1), "conv2": (1, 6, 1, 1), "conv3": (1, 4, 1, 1, 1)}


class TinyEmbedConv(nn.Module):
    """Token embedding, then a Conv1d over the sequence, a Conv2d and a Conv3d, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 12, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(3, 6, kernel_size=3, padding=1, stride=1)
        self.conv3 = nn.Conv3d(6, 4, kernel_size=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.head = nn.Linear(4 * 5 * 7, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2))  # (batch, 12, 6)
        h = self.conv2(torch.tanh(h).view(h.shape[0], 3, 4, 6))  # (batch, 6, 4, 6)
        h = self.conv3(torch.tanh(h).unsqueeze(2))  # (batch, 4, 1, 5, 7)
        return self.head(h.flatten(1))  # (batch, 5)


@pytest.fixture
def base() -> nn.Module:
    torch.manual_seed(0)
    return TinyEmbedConv().eval()


def _ids(rows: int = 3) -> torch.Tensor:
    return torch.randint(0, 50, (rows, 6), generator=torch.Generator().manual_seed(3))


def _peft_dora(base: nn.Module, **overrides) -> nn.Module:
    return peft_dora(base, {**DORA, **overrides}, scale=0.3)


def _ours_from(peft_model: nn.Module, base: nn.Module, tmp_path) -> nn.Module:
    peft_model.save_pretrained(tmp_path / "theirs")
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "theirs")
    return ours


def _peft_params(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter parameters under lorakit's in-memory keys (PEFT's magnitude is ``...<name>.weight``)."""
    out = {}
    for key, p in peft_model.named_parameters():
        if "lora_" in key:
            key = key.removeprefix("base_model.model.")
            out[key.removesuffix(".weight") if "magnitude" in key else key] = p
    return out


def test_fresh_dora_magnitudes_have_peft_shapes_and_values_and_change_nothing(base) -> None:
    ids = _ids()
    before = base(ids)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**DORA))
    ours = copy.deepcopy(base)
    lorakit.add_adapter(ours, LoraConfig(**DORA))
    theirs = _peft_params(peft_model)
    for path, layer in iter_lora_layers(ours):
        m = layer.lora_magnitude_vector["default"]
        assert tuple(m.shape) == MAGNITUDE_SHAPES[path], path
        torch.testing.assert_close(m, theirs[f"{path}.lora_magnitude_vector.default"], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(ids), before, atol=1e-5, rtol=0)


def test_peft_dora_adapter_loads_with_equal_outputs_and_saves_back_in_peft_keys(base, tmp_path) -> None:
    peft_model = _peft_dora(base)
    ids = _ids()
    with torch.no_grad():
        theirs = peft_model(ids)
    ours = _ours_from(peft_model, base, tmp_path)
    torch.testing.assert_close(ours(ids), theirs, atol=ATOL, rtol=0)
    assert (ours(ids) - base(ids)).abs().max() > 1e-2  # the adapter does change the outputs

    lorakit.save_adapter(ours, tmp_path / "ours")
    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert sorted(mine) == sorted(peft_file)
    assert all(mine[k].shape == peft_file[k].shape for k in mine)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gradients_equal_peft(base, dropout) -> None:
    """Training mode; with dropout PEFT feeds the dropped-out input to the base term too (same seed, same masks)."""
    peft_model = _peft_dora(base, lora_dropout=dropout).train()
    ours = copy.deepcopy(base)
    lorakit.add_adapter(ours, LoraConfig(**DORA, lora_dropout=dropout))
    theirs = _peft_params(peft_model)
    with torch.no_grad():
        for key, p in lorakit.adapter_state_dict(ours, "default").items():
            p.copy_(theirs[key])
    ours.train()
    ids = _ids()
    outputs = []
    for model in (peft_model, ours):
        torch.manual_seed(11)
        out = model(ids)
        (out.square().sum() + out[:, 0].sum()).backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)
    for key, p in lorakit.adapter_state_dict(ours, "default").items():
        assert p.grad is not None and theirs[key].grad is not None, key
        torch.testing.assert_close(p.grad, theirs[key].grad, atol=1e-4, rtol=1e-4)
    assert all(p.grad.abs().sum() > 0 for p in lorakit.adapter_state_dict(ours, "default").values())


def test_merge_equals_peft_and_unmerge_restores_the_base_bit_for_bit(base, tmp_path) -> None:
    peft_model = _peft_dora(base)
    ours = _ours_from(peft_model, base, tmp_path)
    ids = _ids()
    unmerged = ours(ids)
    original = {n: p.detach().clone() for n, p in ours.named_parameters()}
    lorakit.merge(ours)
    torch.testing.assert_close(ours(ids), unmerged, atol=ATOL, rtol=0)
    merged_ref = peft_model.merge_and_unload().state_dict()
    for path, layer in iter_lora_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, merged_ref[f"{path}.weight"], atol=1e-5, rtol=0)
    lorakit.unmerge(ours)
    assert all(torch.equal(p, original[n]) for n, p in ours.named_parameters())
    torch.testing.assert_close(ours(ids), unmerged, atol=ATOL, rtol=0)


def test_two_merged_dora_adapters_equal_both_active_and_unmerging_one_replays_the_other(base) -> None:
    """The norm of a second merged DoRA adapter is taken of the weight without the first, as the forward does."""
    model = copy.deepcopy(base)
    for name, seed in (("a", 4), ("b", 5)):
        lorakit.add_adapter(model, LoraConfig(**DORA), name=name)
        perturb(lorakit.adapter_state_dict(model, name).items(), seed=seed, scale=0.3)
    lorakit.set_adapter(model, ["a", "b"])
    ids = _ids()
    both = model(ids)
    lorakit.merge(model, ["a"])  # in the active order: a's output is what b rescales
    only_a = {p: layer.base_layer.weight.detach().clone() for p, layer in iter_lora_layers(model)}
    lorakit.merge(model, ["b"])
    torch.testing.assert_close(model(ids), both, atol=ATOL, rtol=0)
    for path, layer in iter_lora_layers(model):
        layer.unmerge("b")
        assert torch.equal(layer.base_layer.weight, only_a[path]), path


def test_dora_and_lora_rows_mix_in_one_routed_batch(base) -> None:
    model = copy.deepcopy(base)
    lorakit.add_adapter(model, LoraConfig(**DORA), name="dora")
    lorakit.add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv2"]), name="plain")
    perturb(lorakit.adapter_state_dict(model, "dora").items(), seed=4, scale=0.3)
    perturb(lorakit.adapter_state_dict(model, "plain").items(), seed=5, scale=0.3)
    ids = _ids(4)
    rows = ["dora", None, "plain", "dora"]
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model(ids)
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                with lorakit.disabled(model):
                    alone = model(ids[i : i + 1])
            else:
                lorakit.set_adapter(model, name)
                alone = model(ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL, rtol=0)
    # with autograd on (routed training) the DoRA rows give every magnitude a gradient
    lorakit.set_trainable(model, ["dora", "plain"])
    with lorakit.route(model, rows):
        model(ids).square().sum().backward()
    mags = [p for k, p in lorakit.adapter_state_dict(model, "dora").items() if "magnitude" in k]
    assert len(mags) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in mags)
