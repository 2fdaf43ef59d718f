"""Damaged training data met during a two-rank run: with data.on_corrupt=skip the bad samples are
skipped, counted in train/skipped_samples and named in the log, and the run finishes (equal batches,
no hang); with stop (the default) the run stops naming the shard."""

from __future__ import annotations

import json
import shutil

import pytest

from trainkit import WORKERS, launch, overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def damaged(train_shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(train_shards / "s-train", root / "s-train")
    shutil.copytree(train_shards / "s-dev", root / "s-dev")
    shards = sorted((root / "s-train").glob("*.tar"))
    truncated = shards[2]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # the second half of the shard is gone
    garbled = shards[5]
    data = bytearray(garbled.read_bytes())
    at = data.index(b"fLaC")
    data[at:at + 4] = b"XXXX"  # one sample's audio no longer decodes
    garbled.write_bytes(bytes(data))
    return root, truncated.name, garbled.name


def test_skip_policy_counts_and_finishes(damaged, tmp_path):
    root, truncated, garbled = damaged
    out = tmp_path / "run"
    r = launch("torchrun", overrides(root, out, "train.max_steps=12", "eval.every_steps=0", "data.on_corrupt=skip", WORKERS))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [row["train/skipped_samples"] for row in rows if "train/skipped_samples" in row]
    assert skipped[-1] >= 2, skipped  # the undecodable sample and the lost half of the truncated shard
    assert skipped == sorted(skipped)
    assert f"{garbled} sample" in r.stderr and truncated in r.stderr


def test_stop_policy_names_the_shard(damaged, tmp_path):
    root, truncated, garbled = damaged
    out = tmp_path / "run"
    r = launch("torchrun", overrides(root, out, "train.max_steps=12", "eval.every_steps=0", WORKERS), timeout=300)
    assert r.returncode != 0
    assert "damaged training data on rank" in r.stderr, r.stderr[-3000:]
    assert truncated in r.stderr or garbled in r.stderr
    assert "data.on_corrupt=skip" in r.stderr
