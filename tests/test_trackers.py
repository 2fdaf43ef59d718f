"""log.trackers: a real MLflow file store and W&B in offline mode, read back after a tiny DeepSpeed run."""

from __future__ import annotations

import json

import pytest
import yaml

from asr_dist.config import merge_config
from asr_dist.trackers import TrackerError, check_trackers
from trainkit import launch, losses, overrides


def wandb_records(path) -> list:
    """The protobuf records of a W&B run file (run-ID.wandb: LevelDB's log format, 32 KiB blocks of records
    with 7-byte headers (CRC, length, type: full, first, middle, last), after a 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, records, partial = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial + chunk)
            records.append(record)
            partial = b""
        elif kind in (2, 3):
            partial += chunk
    return records


def test_tracker_settings_that_cannot_work_say_what_to_change():
    def log(*extra):
        return merge_config(None, ["output_dir=x", "data.train_shards=[x]", "model.preset=tiny", "train.max_steps=1",
                                   *extra]).log

    assert log().trackers == ["tensorboard", "jsonl"]
    check_trackers(log("log.trackers=[tensorboard,jsonl,mlflow,wandb]"))
    with pytest.raises(TrackerError, match="give distinct names from tensorboard, jsonl, mlflow, wandb"):
        check_trackers(log("log.trackers=[neptune]"))
    with pytest.raises(TrackerError, match="choose offline"):
        check_trackers(log("log.wandb_mode=cloud"))
    from asr_dist.trackers import MlflowTracker

    # MLflow refuses "(" and "+" in metric names, which group values (eval.group_by) can hold
    assert MlflowTracker.metric_name("eval/dev/wer_by_accent/other (unknown)+x") == "eval/dev/wer_by_accent/other _unknown__x"


@pytest.mark.slow  # launches training twice
def test_mlflow_and_wandb_get_what_tensorboard_gets(train_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store, read back here
    out = tmp_path / "run"
    args = ["train.max_steps=4", "eval.every_steps=2", "train.checkpoint_every=0",
            "log.trackers=[tensorboard,jsonl,mlflow,wandb]", "log.run_name=tiny-da"]
    r = launch("python", overrides(train_shards, out, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    # MLflow: the default file store in output_dir/mlruns, every metric at its step, the config, the artifacts
    client = MlflowClient((out / "mlruns").as_uri())
    run = client.get_run((out / ".mlflow_run_id").read_text().strip())
    assert run.info.run_name == "tiny-da" and run.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert logged == pytest.approx(losses(out), rel=1e-9) and sorted(logged) == [1, 2, 3, 4]
    wer = [m.step for m in client.get_metric_history(run.info.run_id, "eval/dev/wer")]
    assert sorted(wer) == [2, 4]
    lr = yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"]  # the resolved config of the run
    assert run.data.params["optim.lr"] == str(lr) and run.data.params["train.max_steps"] == "4"
    assert "deepspeed.train_batch_size" in run.data.params
    files = {a.path for folder in ("model", "eval", "config") for a in client.list_artifacts(run.info.run_id, folder)}
    assert files == {"model/README.md", "eval/eval_results.json", "config/config.yaml"}
    # W&B offline: the run's file under output_dir/wandb (what `wandb sync` uploads): every metric at its step,
    # the config, the artifacts
    (offline,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(offline)
    def items(rows):  # a key with "/" may be stored whole or split into nested_key
        return {row.key or "/".join(row.nested_key): json.loads(row.value_json) for row in rows}

    history = [{"_step": r.history.step.num, **items(r.history.item)} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert {h["_step"]: h["train/loss"] for h in history} == pytest.approx(losses(out), rel=1e-9)
    assert sorted(h["_step"] for h in history if "eval/dev/wer" in h) == [2, 4]
    config = {k: v for r in records if r.WhichOneof("record_type") == "config" for k, v in items(r.config.update).items()}
    assert config["optim.lr"] == lr and config["train.max_steps"] == 4
    assert sum(r.WhichOneof("record_type") == "artifact" for r in records) == 3
    # a tracker that cannot start stops the run before it trains, saying why
    bad = tmp_path / "bad"
    r = launch("python", overrides(train_shards, bad, *args, "log.mlflow_tracking_uri=bogus://nowhere"))
    assert r.returncode != 0
    assert "MLflow at bogus://nowhere does not answer" in r.stderr and "log.mlflow_tracking_uri" in r.stderr
    assert not (bad / "checkpoints").exists()
