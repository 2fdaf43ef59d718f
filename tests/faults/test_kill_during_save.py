"""SIGKILL of the whole job while a checkpoint is being written: the partial checkpoint (no COMPLETE
marker) is never loaded; the restart resumes from the previous one and reaches the planned end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from trainkit import REPO, env, launch, losses, overrides

pytestmark = pytest.mark.slow


def test_kill_while_saving_resumes_from_the_previous_checkpoint(train_shards, tmp_path):
    out = tmp_path / "run"
    args = overrides(train_shards, out, "train.max_steps=10", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                     "eval.every_steps=0", "data.eval_shards={}")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                             str(REPO / "configs" / "test.yaml"), *args], env=env(), stdout=log, stderr=log,
                            start_new_session=True)
    ckpts = out / "checkpoints"
    partial = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and partial is None:
        if ckpts.is_dir():
            done = [p for p in ckpts.glob("step-*") if (p / "COMPLETE").exists()]
            writing = [p for p in ckpts.glob("step-*") if not (p / "COMPLETE").exists() and any(p.iterdir())]
            if done and writing:
                partial = writing[0]
                os.killpg(proc.pid, signal.SIGKILL)  # the job, its loader workers, everything, mid-save
        time.sleep(0.002)
    proc.wait()
    assert partial is not None, "never caught a save in progress: " + (tmp_path / "first.log").read_text()[-2000:]
    assert not (partial / "COMPLETE").exists()
    complete = sorted(p.name for p in ckpts.glob("step-*") if (p / "COMPLETE").exists())
    r = launch("python", args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ignoring incomplete checkpoint {partial}" in r.stderr
    resumed = re.search(r"resumed from \S+/(step-\d+) at step", r.stderr).group(1)
    assert resumed == complete[-1] and resumed < partial.name
    # nothing lost or seen twice: every step's loss equals an uninterrupted run's (fp32 on CPU)
    whole = tmp_path / "whole"
    assert launch("python", overrides(train_shards, whole, *args[-5:])).returncode == 0
    assert losses(out) == losses(whole) and max(losses(out)) == 10


def test_a_save_over_a_cut_off_directory_of_the_same_step_clears_it_first(train_shards, tmp_path):
    """A resumed run reaching the step of a cut-off save writes a clean directory: no stale file of
    the earlier save (here another world size's partition, which zero_to_fp32 would read) stays in it."""
    out = tmp_path / "run"
    args = overrides(train_shards, out, "train.max_steps=4", "train.checkpoint_every=2", "eval.every_steps=0",
                     "data.eval_shards={}")
    r = launch("python", args)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = out / "checkpoints" / "step-00000004"
    fresh = sorted(p.name for p in cut.iterdir())
    (cut / "COMPLETE").unlink()  # as if the save had been cut off
    stale = cut / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    stale.write_bytes(b"left by an earlier save on two ranks")
    r = launch("python", args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"resumed from \S+/step-00000002 at step 2", r.stderr), r.stderr[-3000:]
    assert f"removing {cut}, left by an earlier save of step 4" in r.stderr
    assert sorted(p.name for p in cut.iterdir()) == fresh and not stale.exists()
