"""A wrapped model stays the user's transformers model: save_pretrained, generate, torch.compile, HF Trainer and
plain training loops keep working, and gradients equal PEFT's for the same adapter weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.state import adapter_state_dict

transformers = pytest.importorskip("transformers")


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_unloaded_model_save_pretrained_loads_with_plain_transformers(tmp_path):
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    adapted = logits(model)
    lorakit.unload(model, merge=True)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is transformers.LlamaForCausalLM
    torch.testing.assert_close(logits(reloaded), adapted, rtol=1e-4, atol=1e-4)


def test_generate_works_on_a_wrapped_model():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=ATTN, init_lora_weights=False))
    ids = IDS[:1, :4]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], ids)
    lorakit.unload(model, merge=True)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), out)


def test_torch_compile_of_a_wrapped_model_gives_equal_logits_and_follows_adapter_switches():
    model = tiny_llama()
    base = logits(model)
    for name in ("a", "b"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False), name)
    only_b = logits(model)
    lorakit.set_adapter(model, "a")
    only_a = logits(model)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(logits(compiled), only_a, rtol=1e-5, atol=1e-5)
    lorakit.set_adapter(model, "b")  # python-side state: the compiled graph must not go stale
    torch.testing.assert_close(logits(compiled), only_b, rtol=1e-5, atol=1e-5)
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(compiled), base, rtol=1e-5, atol=1e-5)


def test_hf_trainer_updates_only_lora_parameters(tmp_path):
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=4, target_modules=ATTN)).train()
    frozen = frozen_snapshot(model)
    lora_before = {k: t.detach().clone() for k, t in adapter_state_dict(model, "default").items()}
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 128, (8, 12))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    changed = [k for k, t in adapter_state_dict(model, "default").items() if not torch.equal(t, lora_before[k])]
    assert changed and any(".lora_B." in k for k in changed)


def test_adamw_steps_lower_the_loss_and_leave_base_weights_untouched():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()
    frozen = frozen_snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(8):
        loss = model(batch, labels=batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_gradients_equal_peft_for_the_same_adapter_weights():
    peft = pytest.importorskip("peft")
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = lorakit.add_adapter(tiny_llama(), LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    their_params = dict(theirs.named_parameters())
    ours_state = adapter_state_dict(ours, "default")
    with torch.no_grad():
        for key, tensor in ours_state.items():
            their_params["base_model.model." + key].copy_(tensor)
    batch = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    ours_loss = ours(batch, labels=batch).loss
    their_loss = theirs(input_ids=batch, labels=batch).loss
    torch.testing.assert_close(ours_loss, their_loss, rtol=1e-5, atol=1e-5)
    ours_loss.backward()
    their_loss.backward()
    assert len(ours_state) == sum(1 for p in their_params.values() if p.requires_grad)
    for key, tensor in ours_state.items():
        torch.testing.assert_close(tensor.grad, their_params["base_model.model." + key].grad, rtol=1e-4, atol=1e-6)
