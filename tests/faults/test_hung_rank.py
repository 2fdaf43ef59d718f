"""A rank stuck inside an optimizer step while its heartbeat still beats: the progress watchdog on
every rank trips within its bound, each rank's log holds every thread's Python stack (faulthandler),
the stuck rank's names the frame it sleeps in, and the job stops instead of waiting for the
collective timeout. Ranks are independent processes, as srun starts them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from asr_dist.watchdog import EXIT_HUNG
from trainkit import REPO, env, overrides

pytestmark = pytest.mark.slow

# rank 1 sleeps in DeepSpeed's engine.step once step 3 is done; rank 0 goes on and waits in a collective
HANG = '''
import os, runpy, sys, time
import deepspeed.runtime.engine as ds_engine

step = ds_engine.DeepSpeedEngine.step


def _hang_in_step(self, *args, **kw):
    if os.environ["RANK"] == "1" and self.global_steps == 3:
        open(os.environ["HANG_MARK"], "w").write(str(time.time()))
        time.sleep(3600)
    return step(self, *args, **kw)


ds_engine.DeepSpeedEngine.step = _hang_in_step
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''
FLOOR = 8


def test_a_rank_sleeping_in_a_step_stops_the_job_with_every_rank_s_stacks(train_shards, tmp_path):
    out = tmp_path / "run"
    args = overrides(train_shards, out, "train.max_steps=40", "train.checkpoint_every=0", "eval.every_steps=0",
                     "data.eval_shards={}", "distributed.watchdog_factor=5", f"distributed.watchdog_floor_s={FLOOR}")
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    mark = tmp_path / "hung"
    port = 32000 + os.getpid() % 1000
    procs = []
    for rank in range(2):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "HANG_MARK": str(mark)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(REPO / "launch" / "train.py"), "--config",
                                       str(REPO / "configs" / "test.yaml"), *args], env=e,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"rank{rank}.log", "w")))
    logs = lambda: [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]  # noqa: E731
    deadline = time.time() + 300
    while time.time() < deadline and not mark.exists() and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    assert mark.exists(), logs()[0][-3000:] + logs()[1][-3000:]
    hung_at = float(mark.read_text() or time.time())
    for p in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the job hangs: the watchdog did not stop it\n" + logs()[0][-3000:] + logs()[1][-3000:])
    stopped_after = time.time() - hung_at
    err0, err1 = logs()
    assert [p.returncode for p in procs] == [EXIT_HUNG, EXIT_HUNG], err0[-3000:] + err1[-3000:]
    # the bound: the floor (steps take well under FLOOR / 5 s here), a poll, the first rank's wait for the others
    assert stopped_after < FLOOR + 20, stopped_after
    assert "made no optimizer step for" in err0 + err1
    for err in (err0, err1):
        assert "Python stacks of every thread of rank" in err and "most recent call first" in err
        assert "Restart the job to resume from the last complete checkpoint" in err
    # the stuck rank names its frame, and faulthandler's dump shows it
    assert "waits in _hang_in_step (" in err1 and f"{script}\", line" in err1 and "in _hang_in_step" in err1
    # rank 0 names its own frame last (after rank 1's message when rank 1 tripped first): a collective's
    line0 = next(line for line in err0.splitlines() if "watchdog: " in line)
    assert re.findall(r"waits in (\w+) \(", line0)[-1] != "_hang_in_step", line0
    print(f"stopped {stopped_after:.1f} s after rank 1 began to sleep")
