"""Disk full while saving a checkpoint: a clear error, the partial save removed, the previous
checkpoint intact; after space is freed the same command resumes from it. The output directory is a
size-limited tmpfs (needs root to mount; skipped otherwise)."""

from __future__ import annotations

import os
import subprocess

import pytest

from asr_dist.checkpoint import load_safely
from trainkit import launch, overrides

pytestmark = pytest.mark.slow


def du(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")

    def mount(size_kb: int, remount: bool = False):
        opts = f"{'remount,' if remount else ''}size={size_kb}k"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    yield mnt, mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_during_save_keeps_the_previous_checkpoint(train_shards, tmp_path, small_disk):
    mnt, mount = small_disk
    common = ["eval.every_steps=0", "data.eval_shards={}", "train.log_every=1"]
    probe = tmp_path / "probe"  # how much one checkpoint takes
    assert launch("python", overrides(train_shards, probe, "train.max_steps=1", *common)).returncode == 0
    one = du(probe / "checkpoints")
    mount(int(one * 1.5) // 1024)  # room for one checkpoint and the logs, not for a second
    out = mnt / "run"
    args = overrides(train_shards, out, "train.max_steps=9", "train.checkpoint_every=3", *common)
    r = launch("python", args)
    assert r.returncode == 1, r.stderr[-3000:]
    msg = r.stderr.split("training stopped:")[-1]
    assert "could not save checkpoint" in msg and "step-00000006" in msg and "no space left on the device" in msg, msg
    assert "step-00000003 is intact" in msg and "resume from step 3" in msg, msg
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003"]  # the partial one removed
    load_safely(out / "checkpoints" / "step-00000003" / "mp_rank_00_model_states.pt")  # and the old one whole
    mount(int(one * 6) // 1024, remount=True)  # space freed
    r = launch("python", args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-00000003 at step 3" in r.stderr
