import json
import math
import signal

import pytest
import torch
from train_helpers import make_char_tokenizer, make_tiny_llama

import lorakit.training.loop as loop_mod
from lorakit.errors import ConfigError
from lorakit.training import TrainingStopped, run_training
from lorakit.training.checkpoint import list_checkpoints
from lorakit.training.loop import lr_lambda

FAST = dict(batch_size=8, learning_rate=1e-2, progress=False, precision="fp32", eval_generate=False, r=8,
            lora_alpha=16, lora_dropout=0.0)  # fmt: skip


def train(data, out, **kw):
    return run_training({"data": str(data), "output_dir": str(out), **FAST, **kw}, model=make_tiny_llama(),
                        tokenizer=make_char_tokenizer())  # fmt: skip


def test_loss_falls_on_a_tiny_model(pc_data, tmp_path):
    result = train(pc_data, tmp_path / "out", max_steps=30, logging_steps=1, save_steps=10, target_modules="all-linear")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())]
    assert result.status == "completed" and result.steps == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.95 * losses[0]
    assert result.after["eval_loss"] < 0.95 * result.before["eval_loss"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and (tmp_path / "out" / "loss.png").is_file()
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [20, 30]  # save_total_limit=2 keeps the newest


def test_only_adapter_parameters_change(pc_data, tmp_path):
    model, tok = make_tiny_llama(), make_char_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_training({"data": str(pc_data), "output_dir": str(tmp_path / "o"), **FAST, "max_steps": 3}, model=model,
                 tokenizer=tok)  # fmt: skip
    for n, p in model.named_parameters():
        base_name = n.replace(".base_layer", "")
        if "lora_" not in n:
            assert torch.equal(p, before[base_name]), n


def test_output_dir_with_another_run_is_refused_unless_overwrite_or_resume(pc_data, tmp_path):
    train(pc_data, tmp_path / "out", max_steps=2)
    with pytest.raises(ConfigError, match="already holds a lorakit run.*--resume.*--overwrite"):
        train(pc_data, tmp_path / "out", max_steps=2)
    with pytest.raises(ConfigError, match="different run.*learning_rate"):
        train(pc_data, tmp_path / "out", max_steps=2, learning_rate=1e-3, resume=True)
    result = train(pc_data, tmp_path / "out", max_steps=3, overwrite=True)
    assert result.steps == 3 and [s for s, _ in list_checkpoints(tmp_path / "out")] == [3]


def test_output_dir_with_unrelated_files_is_refused(pc_data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds 1 other files"):
        train(pc_data, tmp_path / "out", max_steps=1)


def test_resume_without_checkpoint_is_refused(pc_data, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        train(pc_data, tmp_path / "out", max_steps=1, resume=True)


@pytest.mark.parametrize("kw, msg", [
    ({"learning_rate": 0}, "learning_rate=0"), ({"learning_rate": -1e-3}, "learning_rate=-0.001"),
    ({"learning_rate": float("nan")}, "learning_rate=nan"), ({"max_steps": 0}, "max_steps=0"),
    ({"max_steps": -5}, "max_steps=-5"), ({"num_epochs": 0}, "num_epochs=0"), ({"batch_size": 2.5}, "batch_size=2.5"),
])  # fmt: skip
def test_non_positive_learning_rate_or_steps_are_refused(pc_data, tmp_path, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        train(pc_data, tmp_path / "out", **kw)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pc_data, tmp_path, monkeypatch):
    real = loop_mod.causal_lm_loss
    calls = {"n": 0}

    def poisoned(model, batch, reduction="mean", **kwargs):
        calls["n"] += 1
        loss = real(model, batch, reduction, **kwargs)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(loop_mod, "causal_lm_loss", poisoned)
    with pytest.raises(TrainingStopped, match=r"NaN/inf at step 6.*last good checkpoint is .*checkpoint-4 \(step 5\)"):
        train(pc_data, tmp_path / "out", max_steps=20, save_steps=2)
    steps = [s for s, _ in list_checkpoints(tmp_path / "out")]
    assert steps == [2, 4]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # no final adapter from a NaN run


def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(pc_data, tmp_path, monkeypatch):
    real = loop_mod.Trainer._log

    def log_then_interrupt(self, record):
        real(self, record)
        if record.get("step") == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loop_mod.Trainer, "_log", log_then_interrupt)
    result = train(pc_data, tmp_path / "out", max_steps=20, logging_steps=1, save_steps=100)
    assert result.status == "interrupted" and result.steps == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [3]
    monkeypatch.setattr(loop_mod.Trainer, "_log", real)
    resumed = train(pc_data, tmp_path / "out", max_steps=20, logging_steps=1, save_steps=100, resume=True)
    assert resumed.status == "completed" and resumed.steps == 20


def test_lora_plus_gives_b_a_larger_learning_rate(pc_data, tmp_path):
    model = make_tiny_llama()
    from lorakit import LoraConfig, add_adapter
    from lorakit.training.loop import param_groups
    from lorakit.training.train_config import TrainConfig

    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    groups = param_groups(model, TrainConfig(learning_rate=1e-3, loraplus_lr_ratio=16))
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert all(p.shape[1] == 4 for p in groups[1]["params"])  # B is (out, r)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda("cosine", warmup=4, total=20)
    assert f(0) < f(3) <= 1.0 and math.isclose(f(4), 1.0) and f(19) < 0.02 and f(12) < f(8)


def test_qlora_run_trains_adapters_over_a_4bit_base(pc_data, tmp_path):
    from lorakit.quant import is_quantized

    model = make_tiny_llama()
    result = run_training({"data": str(pc_data), "output_dir": str(tmp_path / "q"), **FAST, "max_steps": 20,
                           "logging_steps": 1, "target_modules": "all-linear", "quantize": "nf4"},
                          model=model, tokenizer=make_char_tokenizer())  # fmt: skip
    assert sum(is_quantized(m) for m in model.modules()) == 14  # 7 block linears x 2 layers
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "q" / "metrics.jsonl").read_text().splitlines())]
    assert result.status == "completed" and sum(losses[-5:]) / 5 < 0.95 * losses[0]
    assert (tmp_path / "q" / "adapter_model.safetensors").is_file()


def test_unknown_quantization_is_refused_at_construction(pc_data, tmp_path):
    with pytest.raises(ConfigError, match="quantize='int3'"):
        train(pc_data, tmp_path / "x", quantize="int3")


def test_lorakit_train_is_the_python_face_of_the_cli(pc_data, tmp_path):
    import lorakit

    result = lorakit.train(data=str(pc_data), output_dir=str(tmp_path / "p"), max_steps=2, **FAST,
                           model=make_tiny_llama(), tokenizer=make_char_tokenizer())  # fmt: skip
    assert result.status == "completed" and (tmp_path / "p" / "adapter_config.json").is_file()
