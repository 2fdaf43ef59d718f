"""How a run ends: checkpoint averaging (train.average_last / average_best, `asr-dist average`) and early
stopping (train.early_stopping), with real DeepSpeed runs of the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asr_dist.checkpoint import prune
from asr_dist.cli import main
from asr_dist.config import ConfigError, merge_config, validate
from asr_dist.export import checkpoint_weights
from asr_dist.state import best_steps, early_stop
from trainkit import dev_audio, launch, overrides


def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def config(*extra):
    cfg = merge_config(None, ["output_dir=x", "data.train_shards=[x]", "data.eval_shards.dev=y", "model.preset=tiny",
                              "train.max_steps=10", *extra])
    validate(cfg)
    return cfg


def test_early_stopping_counts_evaluations_since_the_best_from_the_history():
    cfg = config("train.early_stopping={metric: cer, patience: 2, min_delta: 0.01}")
    rows = [{"step": 2, "dev_cer": 0.5}, {"step": 4, "dev_cer": 0.4}, {"step": 6, "dev_cer": 0.395},
            {"step": 8, "dev_cer": 0.2}, {"step": 10, "dev_cer": 0.195}]
    assert early_stop(rows[:4], cfg) is None and early_stop(rows, cfg) is None  # 0.395 is no improvement by > 0.01
    stop = early_stop(rows + [{"step": 12, "dev_cer": 0.3}], cfg)
    assert stop and "dev CER has not improved by more than 0.01 in 2 evaluations" in stop and "at step 8" in stop
    assert early_stop(rows + [{"step": 12, "dev_cer": 0.3}], config()) is None  # off by default
    assert best_steps(rows, ("dev", "cer"), 2) == [10, 8]


def test_run_end_settings_that_cannot_work_say_what_to_change():
    cases = [(["train.early_stopping={patience: 2, metrik: wer}"], "did you mean 'metric'"),
             (["train.early_stopping={patience: 0}"], "patience=0"),
             (["train.early_stopping={patience: 2, metric: bleu}"], "choose wer, cer or loss"),
             (["train.early_stopping={patience: 2, set: test}"], "not an evaluation set; choose one of dev"),
             (["train.average_last=3"], "raise train.keep_checkpoints to at least 3"),
             (["train.average_last=1"], "averaging one checkpoint"),
             (["train.average_best=2", "eval.every_steps=0"], "give data.eval_shards and eval.every_steps > 0"),
             (["train.average_last=2", "train.checkpoint_every=5", "train.save_final=false"],
              "train.average_last exports its model when training ends, and train.save_final=false exports none")]
    for override, words in cases:
        with pytest.raises(ConfigError, match=words):
            config(*override)


def test_save_final_false_ends_a_run_without_a_checkpoint_or_an_export(train_shards, tmp_path):
    out = tmp_path / "run"
    r = launch("python", overrides(train_shards, out, "train.max_steps=2", "train.checkpoint_every=0",
                                   "eval.every_steps=0", "data.eval_shards={}", "train.save_final=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"train.save_final=false: no checkpoint of step 2 and no {out}/model" in r.stderr
    assert sorted(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in line) == [1, 2]
    assert not (out / "model").exists() and not list(out.glob("checkpoints/step-*"))


def test_pruning_keeps_the_protected_best_checkpoints(tmp_path):
    for step in (2, 4, 6, 8, 10):
        d = tmp_path / f"step-{step:08d}"
        d.mkdir()
        (d / "COMPLETE").write_text("{}")
    prune(tmp_path, keep=2, protect=(4,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000008", "step-00000010"]


@pytest.mark.slow  # launches training
def test_average_last_exports_the_mean_of_the_checkpoints_at_zero_3(train_shards, tmp_path, capsys):
    out = tmp_path / "run"
    r = launch("python", overrides(train_shards, out, "train.max_steps=6", "train.checkpoint_every=3",
                                   "train.average_last=2", "eval.every_steps=0", "distributed.zero_stage=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = [out / "checkpoints" / "step-00000003", out / "checkpoints" / "step-00000006"]
    a, b = (checkpoint_weights(p)[1] for p in ckpts)  # gathered from the ZeRO-3 partitions
    exported = weights(out / "model")
    assert set(exported) == set(a)
    differ = 0
    for k, v in exported.items():
        if a[k].is_floating_point():
            assert torch.allclose(v, (a[k] + b[k]) / 2, atol=1e-7), k
            differ += not torch.equal(a[k], b[k])
    assert differ > 10  # the two checkpoints differ: the mean is neither
    card = (out / "model" / "README.md").read_text()
    assert "## Checkpoint averaging" in card and "the last 2: steps 3, 6" in card and "## Training results" in card
    assert json.loads((out / "model" / "asr_dist.json").read_text())["averaged"]["steps"] == [3, 6]
    # the averaged export loads in transformers' pipeline
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(out / "model"), device="cpu")
    assert isinstance(asr(next(iter(dev_audio(train_shards).values())))["text"], str)
    # the command does the same from the run's directory
    assert main(["average", "--run", str(out), "--last", "2", "-o", str(tmp_path / "avg")]) == 0
    assert "averaged 2 checkpoints (the last 2): step-00000003, step-00000006" in capsys.readouterr().out
    assert all(torch.equal(v, exported[k]) for k, v in weights(tmp_path / "avg").items())
    assert main(["average", "--checkpoints", str(ckpts[0]), "-o", str(tmp_path / "one")]) == 2
    assert main(["average", "--run", str(out), "--best", "2", "-o", str(tmp_path / "best")]) == 2
    assert "fewer than --best 2" in capsys.readouterr().err and not (tmp_path / "best").exists()


@pytest.mark.slow  # launches training
def test_early_stopping_stops_exports_the_best_and_keeps_its_patience_across_a_resume(train_shards, tmp_path):
    out = tmp_path / "run"
    # min_delta 10: no evaluation after the first counts as an improvement
    args = ["eval.every_steps=2", "train.checkpoint_every=2", "train.keep_checkpoints=3",
            "train.early_stopping={metric: wer, patience: 3, min_delta: 10}"]
    r = launch("python", overrides(train_shards, out, "train.max_steps=4", *args))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopping early" not in r.stderr  # evaluations at steps 2 and 4: one since the best
    r = launch("python", overrides(train_shards, out, "train.max_steps=20", *args))
    assert r.returncode == 0, r.stderr[-3000:]
    # resumed at 4 with one evaluation since the best counted: 6 and 8 reach the patience of 3
    assert "stopping early at step 8: dev WER has not improved by more than 10 in 3 evaluations" in r.stderr
    assert "the best, " in r.stderr and "output_dir/model holds the best model" in r.stderr
    assert (out / "checkpoints" / "step-00000008" / "COMPLETE").exists()
    assert not (out / "checkpoints" / "step-00000010").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "eval/dev/wer" in row]
    assert steps == [2, 4, 6, 8]  # no second evaluation of step 8 at the end
    best, model = weights(out / "best"), weights(out / "model")
    assert all(torch.equal(v, model[k]) for k, v in best.items())  # output_dir/model is the best model
    assert "Training stopped early at step 8" in (out / "model" / "README.md").read_text()
