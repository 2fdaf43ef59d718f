"""Where this process sits in the job: the only module that reads the launcher's environment.

  deepspeed / torchrun : RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (deepspeed also --local_rank)
  srun (one task a GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS of a job step (SLURM_STEP_ID set:
                         the batch script itself is not a rank); master = first host of the job's
                         node list (scontrol show hostnames), port derived from the job id
  plain python         : rank 0 of 1, on a free local port

Everything else receives ``rank`` and ``world_size`` as arguments.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import subprocess


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
    variables it set, so that child processes do not mistake themselves for ranks of it."""
    import torch.distributed as dist

    if denv.launcher == "single":
        for k in _env_vars(denv):
            os.environ.pop(k, None)
    elif dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_process_group(denv: DistEnv, timeout_minutes: int) -> None:
    """Start torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU)."""
    import deepspeed
    import torch.distributed as dist

    os.environ.update(_env_vars(denv))  # DeepSpeed reads LOCAL_RANK & co. from here
    if dist.is_available() and dist.is_initialized():
        return
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False,
                               rank=denv.rank, world_size=denv.world_size)


def configure_accelerator() -> str:
    """DeepSpeed's accelerator: CUDA when a GPU is visible, else its CPU accelerator (gloo). Must run
    before deepspeed is imported; an explicit DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]
