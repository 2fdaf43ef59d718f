"""The end of a rank's process, where C++ threads can abort it after a run that finished well.

The heartbeat's and the watchdog's threads: stop() waits for a store call in progress. Both are daemon threads that call the job's rendezvous store, C++ code that releases the GIL. One that comes
back from such a call while the interpreter finalizes cannot take the GIL again, and the process aborts with
"terminate called without an active exception" (SIGABRT) after a run that had finished well."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainkit import REPO

SCRIPT = r"""
import datetime, sys, time
import torch.distributed as dist
from asr_dist.distributed import Heartbeat
from asr_dist.watchdog import Watchdog

store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30))
dist.init_process_group("gloo", store=store, rank=0, world_size=1)


class SlowStore:
    # the real store, answering after a second (one under load, or one whose host has just ended)
    def __getattr__(self, name):
        def call(*args):
            try:
                store.wait(["never"], datetime.timedelta(seconds=1))
            except Exception:  # its time-out
                pass
            return getattr(store, name)(*args)
        return call


if sys.argv[1] == "heartbeat":
    thread = Heartbeat(0, 1, timeout=1.2)  # beats every 0.2 s
    thread._store = SlowStore()
else:
    thread = Watchdog(0, 1, factor=2, floor_s=2, store=SlowStore())  # looks every 0.2 s
time.sleep(0.6)  # its thread is inside a store call now
thread.stop()
dist.destroy_process_group()


class SlowTeardown:  # the interpreter's finalization takes a while, as after a training run
    def __del__(self, _sleep=time.sleep):
        _sleep(1.5)


keep = SlowTeardown()
print("finished")
"""


@pytest.mark.parametrize("which", ["heartbeat", "watchdog"])
def test_a_stopped_thread_is_out_of_its_store_call_before_the_interpreter_ends(which):
    r = subprocess.run([sys.executable, "-c", SCRIPT, which], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "terminate called" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "finished"


def test_the_command_ends_after_its_exit_handlers_with_its_code_and_its_output(tmp_path):
    """`asr-dist` and launch/*.py end without the interpreter's finalization (where gloo's worker threads can
    abort the process), but after everything a normal exit does for Python code."""
    script = (
        "import atexit, sys\n"
        "from asr_dist.cli import run\n"
        "atexit.register(print, 'the exit handler ran')\n"
        "print('buffered', end=' ')  # stdout is a pipe here: held in the buffer until flushed\n"
        "run(['evaluate', '--model', sys.argv[1], '--shards', sys.argv[1]])\n"
        "print('never')\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "missing")], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]  # the usage error's code, as main() returns it
    assert r.stdout == "buffered the exit handler ran\n"
    assert "asr-dist: error:" in r.stderr and "missing" in r.stderr
