"""Where a process sits in the job, read from each launcher's environment."""

from __future__ import annotations

from asr_dist.distributed import _slurm_master, device_index, get_env


def test_torchrun_and_deepspeed_variables_win():
    e = get_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "gpu7", "MASTER_PORT": "29511",
                 "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"})
    assert (e.rank, e.local_rank, e.world_size, e.master_addr, e.master_port, e.launcher) == (3, 1, 4, "gpu7", 29511, "torchrun")


def test_srun_task_is_a_rank_with_master_on_the_first_node():
    e = get_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
                 "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (e.rank, e.local_rank, e.world_size, e.launcher) == (5, 1, 8, "slurm")
    assert e.master_addr == "gpu07" and e.master_port == 20000 + 123456 % 20000


def test_batch_script_itself_is_not_a_rank():
    # sbatch sets SLURM_PROCID=0 and SLURM_NTASKS=N in the batch shell too; only srun steps have a step id
    e = get_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")


def test_master_from_node_lists():
    for nodelist, first in [("a01,a02", "a01"), ("gpu[3-4,9]", "gpu3"), ("single", "single")]:
        assert _slurm_master(nodelist) == first


def test_device_index_with_all_or_one_visible_gpu():
    e = get_env({"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8"})
    assert device_index(e, 8) == 2  # every GPU visible: the local rank picks one
    assert device_index(e, 1) == 0  # srun --gpus-per-task=1: the one it sees
