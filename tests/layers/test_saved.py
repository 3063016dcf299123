"""ModulesToSave: a trainable per-adapter copy that runs instead of the original, which survives untouched."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from lorakit.layers import ModulesToSave


def _saved(training: bool = False) -> ModulesToSave:
    torch.manual_seed(0)
    original = nn.Linear(6, 4).train(training)
    for p in original.parameters():
        p.requires_grad_(False)
    wrapper = ModulesToSave(original)
    wrapper.add("default")
    wrapper.set_active(["default"])
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    return wrapper


def test_active_copy_runs_and_disabling_runs_the_original():
    wrapper = _saved()
    x = torch.randn(2, 6)
    torch.testing.assert_close(wrapper(x), wrapper.modules_to_save["default"](x))
    wrapper.disable_adapters = True
    torch.testing.assert_close(wrapper(x), wrapper.original_module(x))


def test_copy_is_trainable_and_independent_of_the_frozen_original():
    wrapper = _saved()
    clone = wrapper.modules_to_save["default"]
    assert all(p.requires_grad for p in clone.parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert not torch.equal(clone.weight, wrapper.original_module.weight)


def test_copy_takes_the_wrappers_train_eval_mode():
    assert not _saved(training=False).modules_to_save["default"].training
    assert _saved(training=True).modules_to_save["default"].training


def test_attributes_of_the_wrapped_module_are_readable_through_the_wrapper():
    wrapper = _saved()
    assert wrapper.weight is wrapper.modules_to_save["default"].weight  # e.g. get_output_embeddings().weight
    assert wrapper.in_features == 6 and wrapper.out_features == 4
    wrapper.disable_adapters = True
    assert wrapper.weight is wrapper.original_module.weight


def test_wrapper_survives_deepcopy_and_pickling():
    wrapper = _saved()
    x = torch.randn(2, 6)
    expected = wrapper(x)
    torch.testing.assert_close(copy.deepcopy(wrapper)(x), expected)
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected)
