"""A rank killed with SIGKILL mid-run: the others stop within the heartbeat timeout naming the lost
rank, never hang; a restart resumes from the last complete checkpoint and ends where it should.
Ranks are started as independent processes, as srun starts them (no agent to clean up after them)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from trainkit import REPO, WORKERS, env, losses, overrides

pytestmark = pytest.mark.slow
ARGS = ["train.max_steps=14", "train.checkpoint_every=3", "eval.every_steps=0", "data.eval_shards={}",
        "distributed.heartbeat_timeout_s=4", WORKERS]


def start_ranks(args: list[str], port: int, logs) -> list[subprocess.Popen]:
    """Two ranks, stderr to files (a rank's loader workers may outlive it by a moment, holding a pipe)."""
    procs = []
    for rank in range(2):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                                       str(REPO / "configs" / "test.yaml"), *args], env=e,
                                      stdout=subprocess.DEVNULL, stderr=open(logs / f"rank{rank}.log", "w")))
    return procs


@pytest.mark.parametrize("victim", [1, 0])
def test_sigkill_of_one_rank_stops_the_other_naming_it_then_resumes(train_shards, tmp_path, victim):
    out = tmp_path / "run"
    args = overrides(train_shards, out, *ARGS)
    port = 31000 + os.getpid() % 1000 + victim
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    procs = start_ranks(args, port, first)
    deadline = time.time() + 300
    while time.time() < deadline and len(losses(out) if (out / "metrics.jsonl").exists() else {}) < 7:
        time.sleep(0.05)
    assert len(losses(out)) >= 7, (first / "rank0.log").read_text()[-3000:]
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()
    survivor = procs[1 - victim]
    try:
        survivor.wait(timeout=60)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail("the surviving rank hangs after its peer was killed: " + (first / f"rank{1 - victim}.log").read_text()[-3000:])
    procs[victim].wait()
    err = (first / f"rank{1 - victim}.log").read_text()
    stopped_after = time.time() - killed_at
    assert survivor.returncode not in (0, None), err[-3000:]
    assert stopped_after < 30, stopped_after  # heartbeat timeout 4 s, plus start-up of the diagnosis
    if victim == 1:
        assert re.search(r"rank 1 of 2 has not been heard from for \d+ s", err), err[-3000:]
    else:  # rank 0 also held the job's rendezvous store
        assert "rank 0 or the launcher has ended" in err or "rank 0 of 2 has not been heard from" in err, err[-3000:]
    assert "restart the job to resume from the last complete checkpoint" in err
    done = sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert done, "no complete checkpoint before the kill"
    # restart: resumes from the last complete checkpoint and ends at the planned step
    procs = start_ranks(args, port + 2, second)
    for p in procs:
        p.wait(timeout=300)
    errs = [(second / f"rank{r}.log").read_text() for r in range(2)]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    resumed = int(re.search(r"resumed from \S+step-(\d+) at step", errs[0]).group(1))
    assert f"step-{resumed:08d}" == done[-1]
    assert max(losses(out)) == 14
