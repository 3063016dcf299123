"""A model with lorakit adapters trains under transformers.Trainer and TRL's SFTTrainer unchanged; the adapter
lorakit.save_adapter then writes loads in PEFT with the same logits."""

import pytest
import torch
from train_helpers import make_char_tokenizer, make_tiny_llama, pc_rows

import lorakit

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
STEPS = 20


def lora_model():
    model = make_tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return model


def text_rows(n=48):
    return [{"text": f"{r['prompt']} -> {r['completion']}"} for r in pc_rows(n)]


def common_args(tmp_path):
    return dict(output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, lr_scheduler_type="constant",
                dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_peft_loads_it(trainer, tmp_path):
    """``lorakit.save_adapter`` of the trained model -> PEFT -> the same logits as the trained model.

    Under mixed precision (TRL's default ``bf16=True``) accelerate wraps ``model.forward`` in autocast; unwrapping
    restores the plain fp32 forward, so the comparison is exact.
    """
    peft = pytest.importorskip("peft")
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    lorakit.save_adapter(model, tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "adapter")).eval()
    model.eval()
    ids = torch.tensor([[5, 17, 33, 60, 2, 9, 71, 44]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    base = make_tiny_llama()(input_ids=ids).logits
    assert not torch.allclose(ours, base, atol=1e-3)  # training moved the adapter away from a no-op
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_hf_trainer_trains_lorakit_adapters(tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = make_char_tokenizer()
    model = lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ds = datasets.Dataset.from_list(text_rows()).map(lambda r: tok(r["text"]), remove_columns=["text"])
    trainer = Trainer(model=model, args=TrainingArguments(**common_args(tmp_path)), train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))  # fmt: skip
    trainer.train()
    curve = losses(trainer)
    assert len(curve) == STEPS and sum(curve[-3:]) / 3 < 0.95 * curve[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # base untouched
    assert_peft_loads_it(trainer, tmp_path)


def test_trl_sft_trainer_trains_lorakit_adapters(tmp_path):
    trl = pytest.importorskip("trl")
    tok = make_char_tokenizer()
    model = lora_model()
    config = trl.SFTConfig(**common_args(tmp_path), max_length=64, packing=False, dataset_text_field="text")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(text_rows()),
                             processing_class=tok)  # fmt: skip
    trainer.train()
    curve = losses(trainer)
    assert len(curve) == STEPS and sum(curve[-3:]) / 3 < 0.95 * curve[0]
    assert_peft_loads_it(trainer, tmp_path)
