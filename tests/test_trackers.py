"""Tracker backends beside metrics.jsonl: W&B (offline), MLflow (file store), TensorBoard text."""

from __future__ import annotations

import glob
import json
import struct
import time

import ml_collections
import pytest

from jaxsd.metrics import MetricsWriter
from jaxsd.train.observe import backends

CONFIG = {"seed": 3, "optim": {"lr": 1e-3, "schedule": "constant"}}
SAMPLE = {"prompt": "1+1=?", "response": "<answer>2</answer>", "reward": 1.0,
          "feedback": None, "teacher_context": "1+1=?\nCorrect solution: 2"}  # fmt: skip


def _leveldb_records(raw: bytes, header: int, block: int = 32768):
    """Records of a LevelDB-log file (W&B's .wandb format): 7-byte chunk headers per block."""
    pos, buf = header, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        buf += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            yield buf
            buf = b""


def _tfrecords(path: str):
    """Event protos of a TensorBoard event file (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    raw = open(path, "rb").read()
    pos = 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(raw[pos + 12 : pos + 12 + length])
        yield event
        pos += 12 + length + 4


def _wandb_history_and_config(path: str, steps: int, wait_s: float = 10.0):
    """History records and config of a W&B offline run file, re-read for up to `wait_s` until
    `steps` history records are in it (W&B's service process writes the file)."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait_s
    while True:
        history, config = [], {}
        for data in _leveldb_records(open(path, "rb").read(), header=7):
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                item = record.history.item
                history.append({i.key or "/".join(i.nested_key): i.value_json for i in item})
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        if len(history) >= steps or time.monotonic() > deadline:
            return history, config
        time.sleep(0.2)


def test_wandb_offline_mlflow_and_tensorboard_get_scalars_config_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    names = ("jsonl", "tensorboard", "wandb", "mlflow")
    with MetricsWriter(run_dir, backends=names, config=CONFIG, project="jaxsd-test") as writer:
        writer.write(1, {"loss": 0.5, "eval/mean@16": 0.25})
        writer.write(2, {"loss": 0.125, "eval/mean@16": 0.75})
        writer.write_samples(2, [SAMPLE])

    # W&B: the offline run file holds each step's scalars.
    (wandb_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = _wandb_history_and_config(wandb_file, steps=2)
    assert [
        (json.loads(h["_step"]), json.loads(h["loss"]), json.loads(h["eval/mean@16"]))
        for h in history
    ] == [(1, 0.5, 0.25), (2, 0.125, 0.75)]
    assert config["seed"] == 3 and config["optim"]["lr"] == 1e-3
    (table,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files/media/table/*.json"))
    assert json.loads(open(table).read())["data"][0][1:] == list(SAMPLE.values())

    # MLflow: the default file store in the run folder; "@" is not allowed in its keys.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri="file://" + str(run_dir / "mlruns"))
    exp = client.get_experiment_by_name("jaxsd-test")
    (run,) = client.search_runs([exp.experiment_id])
    hist = client.get_metric_history(run.info.run_id, "eval/mean_at_16")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.25), (2, 0.75)]
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["seed"] == "3"
    local = client.download_artifacts(run.info.run_id, "samples/2.json", str(tmp_path))
    assert json.loads(open(local).read())[0]["teacher_context"] == SAMPLE["teacher_context"]

    # TensorBoard: scalars, the config as text + hparams, the samples as text.
    (events,) = glob.glob(str(run_dir / "tb" / "events.*"))
    tags = {}
    for event in _tfrecords(events):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(value)
    assert [v.simple_value for v in tags["loss"]] == [0.5, 0.125]
    config_text = tags["config/text_summary"][0].tensor.string_val[0].decode()
    assert '"lr": 0.001' in config_text
    assert "_hparams_/session_start_info" in tags
    assert "<answer>2</answer>" in tags["samples/text_summary"][0].tensor.string_val[0].decode()
    # samples.jsonl carries the step.
    row = json.loads((run_dir / "samples.jsonl").read_text())
    assert row == {"step": 2, **SAMPLE}


def test_log_backends_are_validated_by_name():
    cfg = ml_collections.ConfigDict({"log": {"backends": "jsonl,tensorbord", "project": "x"}})
    with pytest.raises(ValueError, match=r"log.backends=.*unknown \['tensorbord'\]"):
        backends(cfg)
    cfg.log.backends = "jsonl, wandb,wandb"
    assert backends(cfg) == ("jsonl", "wandb")
