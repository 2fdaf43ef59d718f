"""Where this process sits in the job: the only module that reads the launcher's environment.

  deepspeed / torchrun : RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (deepspeed also --local_rank)
  srun (one task a GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS of a job step (SLURM_STEP_ID set:
                         the batch script itself is not a rank); master = first host of the job's
                         node list (scontrol show hostnames), port derived from the job id
  plain python         : rank 0 of 1, on a free local port

Everything else receives ``rank`` and ``world_size`` as arguments.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import re
import socket
import subprocess
import threading
import time


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun (also deepspeed), slurm, single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):  # no scontrol here: expand the first entry
        m = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
        return m.group(1) + (m.group(2) or "") if m else nodelist


def get_env(environ=None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       _slurm_master(env.get("SLURM_JOB_NODELIST", "127.0.0.1")), 20000 + job % 20000, "slurm")
    return DistEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def device_index(denv: DistEnv, num_devices: int) -> int:
    """The GPU this rank drives: its local rank when it sees every GPU of the node, the one GPU it
    sees when the launcher bound one to it (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank)."""
    return denv.local_rank % max(1, num_devices)


def _env_vars(denv: DistEnv) -> dict[str, str]:
    return dict(RANK=str(denv.rank), LOCAL_RANK=str(denv.local_rank), WORLD_SIZE=str(denv.world_size),
                MASTER_ADDR=denv.master_addr, MASTER_PORT=str(denv.master_port))


def shutdown(denv: DistEnv) -> None:
    """After a run: a launched rank ends its process group; a single process keeps its (world size 1)
    group for a later run in the same process (DeepSpeed caches groups built on it) but takes back the
    variables it set, so that child processes do not mistake themselves for ranks of it, and ends the group
    when the interpreter exits."""
    if denv.launcher == "single":
        for k in _env_vars(denv):
            os.environ.pop(k, None)
        atexit.unregister(end_group)  # once, however many runs
        atexit.register(end_group)
    else:
        end_group()


def end_group() -> None:
    """End the process group, if one is alive. One left to the interpreter's finalization can abort the process
    ("terminate called without an active exception"): gloo's threads still hold work then."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_process_group(denv: DistEnv, timeout_minutes: int) -> None:
    """Start torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU)."""
    import deepspeed
    import torch.distributed as dist

    os.environ.update(_env_vars(denv))  # DeepSpeed reads LOCAL_RANK & co. from here
    if configure_accelerator() == "cuda":
        _select_gpu(denv)
    if dist.is_available() and dist.is_initialized():
        return
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False,
                               rank=denv.rank, world_size=denv.world_size)


def _select_gpu(denv: DistEnv) -> None:
    """Make this rank's GPU (device_index) the current device, and its index LOCAL_RANK, before a process group
    starts: DeepSpeed binds its NCCL group to cuda:LOCAL_RANK and selects that device, and NCCL's object
    collectives use the current one. A rank that sees one GPU (srun --gpus-per-task=1) drives cuda:0 whatever
    its local rank."""
    import torch

    if torch.cuda.is_available():
        index = device_index(denv, torch.cuda.device_count())
        os.environ["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)


def init_torch_process_group(denv: DistEnv, timeout_minutes: int, cuda: bool) -> None:
    """Start torch.distributed without DeepSpeed (evaluation and decoding): NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist

    os.environ.update(_env_vars(denv))
    if cuda:
        _select_gpu(denv)
    if dist.is_available() and dist.is_initialized():
        return
    dist.init_process_group("nccl" if cuda else "gloo", rank=denv.rank, world_size=denv.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))


def configure_accelerator() -> str:
    """DeepSpeed's accelerator: CUDA when a GPU is visible, else its CPU accelerator (gloo). Must run
    before deepspeed is imported; an explicit DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


EXIT_PEER_LOST = 76  # this rank stopped because another one was lost; restart the job to resume


class Heartbeat:
    """Every rank bumps a counter in the job's rendezvous store every ``timeout / 6`` seconds and
    watches the others'. A rank whose counter has not moved for ``timeout`` seconds is lost: this
    rank logs which one and ends, even while its main thread is blocked in a collective (NCCL can
    wait there until the collective timeout; gloo fails at once, but without saying which peer).
    Counters, not clocks, so nodes need not agree on the time; a rank hung in Python still beats,
    so hangs are left to asr_dist.watchdog."""

    def __init__(self, rank: int, world_size: int, timeout: float, on_lost=None):
        import torch.distributed.distributed_c10d as c10d

        self.rank, self.world, self.timeout = rank, world_size, float(timeout)
        self.interval = max(0.2, self.timeout / 6)
        self.on_lost = on_lost or self._exit
        self.lost: str | None = None
        self._stop = threading.Event()
        self._store = c10d._get_default_store()
        self._keys = [f"asr_dist/heartbeat/{r}" for r in range(world_size)]
        self._count = 0
        self._store.set(self._keys[rank], "0")
        self._store.wait(self._keys, datetime.timedelta(seconds=max(60.0, self.timeout)))
        self._seen = {r: ("0", time.monotonic()) for r in range(world_size)}
        self._thread = threading.Thread(target=self._run, name="asr-dist-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._count += 1
                self._store.set(self._keys[self.rank], str(self._count))
                values = self._store.multi_get(self._keys)
            except Exception as e:  # the store lives with rank 0 (or the launcher): it is gone
                if self._stop.wait(self.interval):
                    return  # the job ended normally and its store with it
                self._declare(f"the job's rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                              f"{os.environ.get('MASTER_PORT')} stopped answering ({type(e).__name__}): "
                              f"rank 0 or the launcher has ended")
                return
            now = time.monotonic()
            for r, v in enumerate(values):
                v = v.decode()
                if v != self._seen[r][0]:
                    self._seen[r] = (v, now)
                elif r != self.rank and now - self._seen[r][1] > self.timeout:
                    self._declare(f"rank {r} of {self.world} has not been heard from for {now - self._seen[r][1]:.0f} s: "
                                  f"it was killed, crashed or lost its node (see its own log)")
                    return

    def _declare(self, why: str) -> None:
        if self._stop.is_set():
            return
        self.lost = why
        self.on_lost(why)

    def _exit(self, why: str) -> None:
        import logging

        logging.getLogger("asr_dist.distributed").error(
            "%s. Stopping rank %d; restart the job to resume from the last complete checkpoint.", why, self.rank)
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)

    def diagnose(self, wait: float | None = None) -> str | None:
        """After a collective failed: wait (up to ``timeout`` plus a beat) for the watcher to name the
        lost rank; None when every peer is still beating (the failure was something else)."""
        deadline = time.monotonic() + (self.timeout + 2 * self.interval if wait is None else wait)
        while self.lost is None and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        return self.lost

    def stop(self, wait: float = 10.0) -> None:
        """Stop watching, and wait (up to ``wait`` seconds) for the thread to leave its store call: a daemon thread that
        returns from C++ while the interpreter finalizes aborts the process ("terminate called without an active
        exception")."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(wait)
