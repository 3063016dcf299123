"""--report-to: a real run logs to TensorBoard, MLflow and W&B (offline); each is read back with its own reader."""

import json
import struct

import pytest
from train_helpers import make_char_tokenizer, make_tiny_llama, pc_rows, write_jsonl

from lorakit.errors import ConfigError
from lorakit.training import run_training
from lorakit.training import trackers as trackers_mod
from lorakit.training.trackers import parse_report_to

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

SETTINGS = dict(batch_size=8, learning_rate=1e-2, progress=False, precision="fp32", eval_generate=False, r=4,
                lora_dropout=0.0, max_steps=6, logging_steps=2, eval_steps=3, save_steps=6)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    data = write_jsonl(tmp / "t.jsonl", pc_rows(40))
    mp = pytest.MonkeyPatch()
    for key in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        mp.delenv(key, raising=False)
    mp.setenv("WANDB_SILENT", "true")
    try:
        run_training({"data": str(data), "output_dir": str(tmp / "run"), "report_to": "tensorboard,mlflow,wandb",
                      **SETTINGS}, model=make_tiny_llama(), tokenizer=make_char_tokenizer())  # fmt: skip
    finally:
        mp.undo()
    return tmp / "run"


def jsonl_losses(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_tensorboard_event_files_hold_the_loss_lr_tokens_and_eval(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "eval_loss", "after/eval_loss", "before/eval_loss"} <= tags
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert logged == pytest.approx(jsonl_losses(run_dir), rel=1e-6)
    assert [e.step for e in acc.Scalars("eval_loss")] == [3, 6]
    assert '"max_steps": 6' in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_mlflow_file_store_holds_metrics_and_params(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("lorakit")
    (run,) = client.search_runs([exp.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(jsonl_losses(run_dir), rel=1e-6)
    assert run.data.params["max_steps"] == "6" and run.data.params["report_to"] == "tensorboard,mlflow,wandb"
    assert "after_eval_loss" in run.data.metrics and run.info.status == "FINISHED"


def wandb_records(path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    blocks of 32 KiB whose records carry (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def test_wandb_offline_run_file_holds_history_and_config(run_dir):
    from wandb.proto import wandb_internal_pb2

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, config = {}, {}
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "loss" in row:
                history[row["_step"]] = row["loss"]
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert history == pytest.approx(jsonl_losses(run_dir), rel=1e-6)
    assert config["max_steps"] == 6 and config["r"] == 4


def test_unknown_tracker_and_missing_extra_are_clear(monkeypatch):
    assert parse_report_to("TensorBoard, wandb") == ("tensorboard", "wandb") and parse_report_to("none") == ()
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        parse_report_to("tensorboard,comet")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'lorakit\[wandb\]'"):
        trackers_mod.require_trackers(["tensorboard", "wandb"])
