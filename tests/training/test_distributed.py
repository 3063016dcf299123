"""Multi-process training (issue #7) on this machine's CPU: 2 gloo processes launched by torchrun.

The reference is always one in-process run with the same global batch: 2 processes x batch 2 must end with the
adapter of 1 process x batch 4 (dropout 0, same seed) to 1e-5, whether the processes replicate the model (DDP
style) or shard it (FSDP2), and whether the run was interrupted by a dying process and resumed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_char_tokenizer, make_tiny_llama, pc_rows, write_jsonl

from lorakit.errors import ConfigError
from lorakit.training import run_training
from lorakit.training.checkpoint import list_checkpoints, load_checkpoint_state
from lorakit.training.distributed import Dist, padded_shard, shard
from lorakit.training.model_setup import per_process_batch

WORKER = Path(__file__).parent / "dist_worker.py"
# 25 train rows: with a global batch of 4 the last batch of an epoch has 1 row, so one process gets none.
SETTINGS = dict(max_steps=5, save_steps=2, r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                learning_rate=5e-3, seed=3, progress=False, precision="fp32", logging_steps=1, eval_generate=True,
                gradient_accumulation_steps=2, eval_batch_size=2, dist_timeout=60, max_new_tokens=6)  # fmt: skip


@pytest.fixture
def data(tmp_path: Path) -> dict:
    rows = pc_rows(30, seed=5)
    return {"data": str(write_jsonl(tmp_path / "train.jsonl", rows[:25])),
            "eval_data": str(write_jsonl(tmp_path / "eval.jsonl", rows[25:]))}  # fmt: skip


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def _torchrun(tmp_path: Path, spec: dict, name: str, timeout: float = 300) -> subprocess.CompletedProcess:
    spec_file = tmp_path / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           str(spec_file)]  # fmt: skip
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _single(spec: dict):
    return run_training(spec, model=make_tiny_llama(), tokenizer=make_char_tokenizer())


def _assert_same_adapter(a_dir: Path, b_dir: Path, atol: float = 1e-5) -> None:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
    assert any(float(t.abs().max()) > 1e-3 for k, t in a.items() if "lora_B" in k)  # it did train


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, data):
    ref = _single({**data, **SETTINGS, "output_dir": str(tmp_path / "ref"), "batch_size": 4})
    proc = _torchrun(tmp_path, {**data, **SETTINGS, "output_dir": str(tmp_path / "ddp"), "batch_size": 2}, "ddp")
    _check(proc)
    _assert_same_adapter(tmp_path / "ddp", tmp_path / "ref")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    for k, t in ranks[0]["state"].items():  # both processes end with the very same adapter
        assert torch.equal(t, ranks[1]["state"][k]), k
    for r in ranks:  # evaluation gathered from both processes' shares equals the one-process evaluation
        for when, expected in (("before", ref.before), ("after", ref.after)):
            assert r[when]["exact_match"] == expected["exact_match"] and r[when]["n"] == expected["n"] == 5
            assert r[when]["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    metrics = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ref_metrics = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]  # rank 0 alone logs
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in ref_metrics], rel=1e-5)
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp")] == [4, 5]
    state = load_checkpoint_state(list_checkpoints(tmp_path / "ddp")[-1][1])
    assert state["world_size"] == 2 and not state["fsdp"] and len(state["rng_ranks"]) == 2


def test_fsdp_shards_and_still_equals_one_process(tmp_path, data):
    # global_batch_size: the same config gives 4 rows per micro-batch to one process and 2 to each of two
    settings = {**data, **SETTINGS, "global_batch_size": 8}
    _single({**settings, "output_dir": str(tmp_path / "ref")})
    proc = _torchrun(tmp_path, {**settings, "output_dir": str(tmp_path / "fsdp"), "fsdp": True}, "fsdp")
    _check(proc)
    _assert_same_adapter(tmp_path / "fsdp", tmp_path / "ref")
    assert load_checkpoint_state(list_checkpoints(tmp_path / "fsdp")[-1][1])["fsdp"] is True
    shards = [torch.load(tmp_path / "fsdp" / f"rank{r}.pt")["state"] for r in (0, 1)]
    a_keys = [k for k in shards[0] if ".lora_A." in k]
    assert a_keys and all(shards[r][k].shape[0] == SETTINGS["r"] // 2 for r in (0, 1) for k in a_keys)  # sharded


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_a_dying_process_stops_the_run_and_the_resumed_run_matches(tmp_path, data, fsdp):
    out = tmp_path / "killed"
    spec = {**data, **SETTINGS, "output_dir": str(out), "batch_size": 2, "fsdp": fsdp}
    t0 = time.monotonic()
    proc = _torchrun(tmp_path, {**spec, "die": {"rank": 1, "step": 3}}, "die")
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    assert [s for s, _ in list_checkpoints(out)] == [2]  # the last checkpoint is intact
    assert not (out / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match=r"written by 2 processes.*--nproc-per-node"):
        _single({**spec, "resume": True, "fsdp": False})  # one process cannot continue a two-process run
    _check(_torchrun(tmp_path, {**spec, "resume": True}, "resume"))
    _single({**data, **SETTINGS, "output_dir": str(tmp_path / "ref"), "batch_size": 4})
    _assert_same_adapter(out, tmp_path / "ref")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_launcher_to_stop_them_survivors_exit_with_a_clear_error(tmp_path, data):
    """No torchrun agent here (as when a node dies): rank 0 must notice by itself, not hang."""
    out = tmp_path / "out"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**data, **SETTINGS, "output_dir": str(out), "batch_size": 2, "dist_timeout": 30,
                                     "die": {"rank": 1, "step": 3}}))  # fmt: skip
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=env, text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
    try:
        assert procs[1].wait(timeout=180) == -signal.SIGKILL
        t_dead = time.monotonic()
        assert procs[0].wait(timeout=90) == 1  # within the 30 s timeout (plus start-up slack), not forever
        assert time.monotonic() - t_dead < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = procs[0].stderr.read()
    assert "lorakit: error: rank 0 of 2:" in err and "another process probably died" in err, err[-2000:]
    assert "checkpoint-2" in err and "--resume" in err
    assert [s for s, _ in list_checkpoints(out)] == [2]


def test_torchrun_runs_the_lorakit_cli(tmp_path, data):
    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    args = ["--model", str(model_dir), "--data", data["data"], "--eval-data", data["eval_data"], "--max-steps", "2",
            "--lora-r", "4", "--precision", "fp32", "--no-progress", "--max-new-tokens", "4",
            "--learning-rate", "5e-3"]  # fmt: skip
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lorakit",
           "train"]  # fmt: skip
    proc = subprocess.run([*run, *args, "--output-dir", str(tmp_path / "out"), "--global-batch-size", "4"],
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    _check(proc)
    assert proc.stdout.count("trained 2 steps") == 1  # rank 0 reports, rank 1 stays quiet
    assert "2 processes (replicated, gloo): global batch 4 = 2 per process x 1 accumulation x 2" in proc.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    bad = subprocess.run([*run, *args, "--output-dir", str(tmp_path / "bad"), "--global-batch-size", "3"],
                         env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0
    lines = [x for x in bad.stderr.splitlines() if x.startswith("lorakit: error:")]
    assert len(lines) == 1 and "global_batch_size=3 is not divisible by 2 processes" in lines[0], bad.stderr[-2000:]
    assert "lorakit/train" not in bad.stderr  # no traceback from our code (torchrun adds its own failure report)


def test_global_batch_size_must_divide_over_processes_and_accumulation():
    from lorakit.training.train_config import TrainConfig

    cfg = TrainConfig(global_batch_size=12, gradient_accumulation_steps=3)
    assert per_process_batch(cfg, Dist(world_size=2)).batch_size == 2
    assert per_process_batch(cfg, Dist()).batch_size == 4
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by 8 processes .* = 24"):
        per_process_batch(cfg, Dist(world_size=8))
    with pytest.raises(ConfigError, match="global_batch_size=0"):
        TrainConfig(global_batch_size=0)


def test_shards_cover_every_row_once_and_padded_shards_are_even():
    rows = list(range(7))
    parts = [shard(rows, Dist(rank=r, world_size=3)) for r in range(3)]
    assert [p for p, _ in parts] == [[0, 1, 2], [3, 4], [5, 6]] and [o for _, o in parts] == [0, 3, 5]
    assert shard([9], Dist(rank=1, world_size=2)) == ([], 1)
    padded = [padded_shard(rows, Dist(rank=r, world_size=3)) for r in range(3)]
    assert padded == [([0, 1, 2], 3), ([3, 4, 5], 3), ([6, 0, 0], 1)]
