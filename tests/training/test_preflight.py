import pytest
import torch
from train_helpers import make_char_tokenizer, make_tiny_llama

from lorakit import LoraConfig, add_adapter
from lorakit.training import PreflightError, run_training
from lorakit.training.preflight import check_gradients, check_round_trip, targets_summary


def adapted():
    return add_adapter(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_targets_summary_names_module_kinds_and_share():
    s = targets_summary(adapted(), "default")
    assert "LoRA on 4 modules (q_proj x2, v_proj x2)" in s and "trainable params" in s


def test_round_trip_passes_and_leaves_no_scratch_adapter():
    model = adapted()
    check_round_trip(model, "default")
    from lorakit import list_adapters

    assert list_adapters(model) == ["default"]


def test_missing_gradient_on_lora_b_is_an_error():
    model = adapted()
    with pytest.raises(PreflightError, match="4 of 4 lora_B weights got no gradient"):
        check_gradients(model, "default")  # no backward yet: every grad is None


def test_gradients_reach_every_lora_b_after_one_backward():
    model = adapted().train()
    ids = torch.randint(0, 99, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    check_gradients(model, "default")  # raises PreflightError when one is missing
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_run_passes_preflight(pc_data, tmp_path):
    r = run_training({"data": str(pc_data), "output_dir": str(tmp_path / "o"), "max_steps": 2, "progress": False,
                      "eval_generate": False, "gradient_checkpointing": True, "precision": "fp32"},
                     model=make_tiny_llama(), tokenizer=make_char_tokenizer())  # fmt: skip
    assert r.status == "completed"
