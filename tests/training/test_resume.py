import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from train_helpers import RESUME_SETTINGS, make_char_tokenizer, make_tiny_llama, pc_rows, write_jsonl

from lorakit.training import run_training
from lorakit.training.checkpoint import list_checkpoints

WORKER = Path(__file__).parent / "resume_worker.py"


def _wait_for_checkpoint(proc, out: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s, _ in list_checkpoints(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def test_sigkilled_run_resumed_ends_with_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pc_rows(48))
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(data), str(out), "--slow-after", "6"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for_checkpoint(proc, out, 6)
        time.sleep(0.3)  # step 7 is in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert max(s for s, _ in list_checkpoints(out)) == 6
    assert not (out / "adapter_model.safetensors").exists()

    resumed = run_training({"data": str(data), "output_dir": str(out), "resume": True, **RESUME_SETTINGS},
                           model=make_tiny_llama(), tokenizer=make_char_tokenizer())  # fmt: skip
    reference = run_training({"data": str(data), "output_dir": str(ref_out), **RESUME_SETTINGS},
                             model=make_tiny_llama(), tokenizer=make_char_tokenizer())  # fmt: skip
    assert resumed.steps == reference.steps == 14
    a, b = load_file(out / "adapter_model.safetensors"), load_file(ref_out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the adapter did train (B moved away from its zero init)
    assert any(float(t.abs().max()) > 1e-3 for k, t in a.items() if "lora_B" in k)
