"""A diverging run (learning rate far too high: the loss goes to inf/NaN) stops with a diagnosis naming
the step and the utterances, and leaves a checkpoint whose weights are all finite."""

from __future__ import annotations

import json
import re

import pytest
import torch

from asr_dist.checkpoint import load_safely
from trainkit import launch, overrides

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [0, 2])
def test_divergence_stops_with_keys_and_a_finite_checkpoint(train_shards, tmp_path, stage):
    out = tmp_path / "run"
    r = launch("python", overrides(train_shards, out, "train.max_steps=12", "eval.every_steps=0", "data.eval_shards={}",
                                   "optim.lr=1e3", f"distributed.zero_stage={stage}", "distributed.max_skipped_steps=3",
                                   "train.checkpoint_every=0"))
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr
    assert "training stopped" in err and "inf/NaN" in err, err[-3000:]
    keys = re.findall(r"commonvoice_\d+", err.split("training stopped")[-1])
    assert len(keys) == 8  # the 4 micro-batches of 2 utterances of the bad step on this rank
    saved = int(re.search(r"saved (?:as checkpoint step|at step) (\d+)", err).group(1))
    path = out / "checkpoints" / f"step-{saved:08d}"
    assert (path / "COMPLETE").exists()
    state = load_safely(path / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train/loss"] == row["train/loss"] for row in rows if "train/loss" in row)  # no NaN was logged
    assert not (out / "model").exists()  # nothing diverged was exported
    if stage == 2:
        assert max(row.get("train/skipped_steps", 0) for row in rows) >= 2
