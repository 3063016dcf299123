"""Durable training files: a crash injected at EVERY rename of a save (a forked child exits right there, no cleanup
runs) leaves the old files or the new ones, never a mix; checkpoints are pruned only after the new one is
complete; resume never unpickles code; loading refuses NaN/Inf tensors by name; unknown config keys warn."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import FormatError, LoraConfig
from lorakit.io.atomic import read_adapter_dir
from lorakit.training import checkpoint as ckpt

CRASH = 71  # the child's exit status when the injected crash fires


def _renames(action) -> int:
    """How many os.rename / os.replace calls ``action`` makes (run here, counted)."""
    count = [0]
    real = os.rename, os.replace

    def counting(real_fn):
        def wrapped(*args, **kwargs):
            count[0] += 1
            return real_fn(*args, **kwargs)

        return wrapped

    os.rename, os.replace = counting(real[0]), counting(real[1])
    try:
        action()
    finally:
        os.rename, os.replace = real
    return count[0]


def _crash_at(k: int, action) -> None:
    """Run ``action`` in a forked child that dies (``os._exit``) instead of doing its ``k``-th rename."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest cleanup, no finally blocks after the crash
        count = [0]

        def dying(real_fn):
            def wrapped(*args, **kwargs):
                count[0] += 1
                if count[0] == k:
                    os._exit(CRASH)
                return real_fn(*args, **kwargs)

            return wrapped

        os.rename, os.replace = dying(os.rename), dying(os.replace)
        try:
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == CRASH, f"the crash at rename {k} did not fire"


def _adapter(model, name: str, r: int, seed: int) -> None:
    lorakit.add_adapter(model, LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights=False), name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lorakit.adapter_state_dict(model, name).values():
            t.copy_(torch.randn(t.shape, generator=gen))


def _state_of(folder: Path) -> str:
    """'old' or 'new' (by the saved rank; loading also proves config and weights agree), or 'missing'."""
    if not (folder / "adapter_config.json").is_file():
        return "missing"
    config, tensors = read_adapter_dir(folder)
    model_r = {t.shape[0] for k, t in tensors.items() if "lora_A" in k}
    assert model_r == {config["r"]}, f"config r={config['r']} but weights of rank {model_r}: a mismatch"
    return {2: "old", 4: "new"}[config["r"]]


@pytest.mark.parametrize("shared", [False, True], ids=["own-folder", "shared-folder"])
def test_a_crash_at_every_rename_of_an_adapter_save_leaves_old_or_new(tiny_llama, tmp_path, shared):
    _adapter(tiny_llama, "old", 2, 0)
    _adapter(tiny_llama, "new", 4, 1)
    target = tmp_path / "out" / "adapter"

    def prepare() -> None:
        for p in target.parent.iterdir() if target.parent.exists() else ():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        lorakit.save_adapter(tiny_llama, target, name="old")
        if shared:
            (target / "notes.txt").write_text("kept")

    prepare()
    n = _renames(lambda: lorakit.save_adapter(tiny_llama, target, name="new"))
    assert n >= 2
    seen = set()
    for k in range(1, n + 1):
        prepare()
        _crash_at(k, lambda: lorakit.save_adapter(tiny_llama, target, name="new"))
        state = _state_of(target)
        if state == "missing" and not shared:  # between the two renames of replace_dir: the old one, aside
            (aside,) = [p for p in target.parent.iterdir() if p.name.startswith(".adapter.old-")]
            assert _state_of(aside) == "old"
        seen.add(state)
        if shared:
            assert (target / "notes.txt").read_text() == "kept"
    prepare()
    lorakit.save_adapter(tiny_llama, target, name="new")
    seen.add(_state_of(target))
    assert "new" in seen and ("old" in seen or "missing" in seen)


def test_a_crash_at_every_rename_of_a_checkpoint_keeps_a_complete_one(tiny_llama, tmp_path):
    _adapter(tiny_llama, "x", 2, 0)

    def save(out: Path, step: int) -> None:
        state = {"step": step, "rng": ckpt.rng_state(), "optimizer": {"state": {0: {"m": torch.ones(3)}}}}
        ckpt.save_checkpoint(out, step, lambda p: lorakit.save_adapter(tiny_llama, p, name="x"), state, keep=1)

    probe = tmp_path / "probe"
    probe.mkdir()
    n = _renames(lambda: save(probe, 1))
    for k in range(1, n + 1):
        out = tmp_path / f"run{k}"
        out.mkdir()
        save(out, 1)
        _crash_at(k, lambda out=out: save(out, 2))
        steps = [step for step, _ in ckpt.list_checkpoints(out)]
        assert steps in ([1], [1, 2]), (k, steps)  # the old one is never deleted before the new one is complete
        newest = ckpt.list_checkpoints(out)[-1][1]
        assert ckpt.load_checkpoint_state(newest)["step"] == steps[-1]
        assert _state_of_checkpoint_adapter(newest)


def _state_of_checkpoint_adapter(folder: Path) -> bool:
    config, tensors = read_adapter_dir(folder)
    return config["r"] == 2 and len(tensors) > 0


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_never_unpickles_code(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "checkpoint-1").mkdir()
    torch.save({"step": 1, "payload": _RunsCode(str(marker))}, tmp_path / "checkpoint-1" / ckpt.STATE_FILE)
    with pytest.raises(FormatError, match="unreadable"):
        ckpt.load_checkpoint_state(tmp_path / "checkpoint-1")
    assert not marker.exists()


def test_loading_refuses_nan_and_inf_tensors_by_name(tiny_llama, tmp_path):
    _adapter(tiny_llama, "x", 2, 0)
    lorakit.save_adapter(tiny_llama, tmp_path / "x", name="x")
    config, tensors = read_adapter_dir(tmp_path / "x")
    name = sorted(tensors)[1]
    tensors[name][0, 0] = float("inf")
    from lorakit.io.atomic import atomic_save_tensors

    atomic_save_tensors(tmp_path / "x" / "adapter_model.safetensors", tensors)
    lorakit.delete_adapter(tiny_llama, "x")
    with pytest.raises(FormatError, match=f"tensor {name!r} holds NaN or Inf"):
        lorakit.load_adapter(tiny_llama, tmp_path / "x", name="x")
    assert lorakit.list_adapters(tiny_llama) == []


def test_unknown_config_keys_warn_and_peft_keys_do_not(tmp_path):
    import json

    peft = pytest.importorskip("peft")
    peft.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig.from_dict(written).r == 4
    with pytest.warns(UserWarning, match=r"ignoring keys lorakit does not know: \['lora_future_trick'\]"):
        LoraConfig.from_dict({**written, "lora_future_trick": 3}, source="x/adapter_config.json")
