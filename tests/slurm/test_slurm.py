"""The sbatch scripts on a real SLURM cluster: two nodes on this host (tests/slurm/cluster.sh), CPU
ranks over gloo. Skipped, with the reason, where no cluster can be started (not root, no SLURM)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asr_dist.data.index import iter_shard
from asr_dist.data.writer import BuildOptions, build
from trainkit import REPO, WORKERS, env, losses, overrides

pytestmark = pytest.mark.slow
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
# a CPU test cluster has no GPUs and little memory: these override the scripts' #SBATCH lines
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--time=30"]


def _nodes_in_state(state: str) -> int:
    r = subprocess.run(["sinfo", "-h", "-N", "-t", state, "-o", "%N"], capture_output=True, text=True)
    return len(set(r.stdout.split())) if r.returncode == 0 else 0


def _idle_nodes() -> int:
    r = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc", "-o", "%N"], capture_output=True, text=True)
    return len(set(r.stdout.split())) if r.returncode == 0 else 0


@pytest.fixture(scope="module")
def slurm():
    if not shutil.which("sbatch"):
        pytest.skip("SLURM is not installed; as root: bash tests/slurm/cluster.sh install && bash tests/slurm/cluster.sh start")
    if _idle_nodes() < 2:
        if os.geteuid() != 0:
            pytest.skip("no two-node SLURM cluster is up and starting one needs root (bash tests/slurm/cluster.sh start)")
        r = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or _idle_nodes() < 2:
            pytest.skip(f"the test SLURM cluster did not start: {r.stderr[-1500:]}")
    return True


def sbatch(script: str, args: list[str], cwd: Path, options: list[str]) -> int:
    e = {**env(), "ASR_DIST_HOME": str(REPO), "ASR_DIST_PYTHON": sys.executable}
    r = subprocess.run(["sbatch", "--parsable", *options, str(REPO / "slurm" / script), *args], cwd=cwd, env=e,
                       capture_output=True, text=True, check=True)
    return int(r.stdout.strip().split(";")[0])


def job_info(job: int) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True)
    fields = {}
    for line in r.stdout.splitlines():  # one line per array task; the last wins, all are checked by callers
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
    return fields


def wait(job: int, timeout: float = 600) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True)
        if r.returncode == 0 and not r.stdout.strip():
            return job_info(job)
        time.sleep(1)
    subprocess.run(["scancel", str(job)])
    raise AssertionError(f"job {job} still queued or running after {timeout} s: {job_info(job)}")


def train_args(train_shards: Path, out: Path) -> list[str]:
    return [str(REPO / "configs" / "test.yaml"),
            *overrides(train_shards, out, "train.max_steps=12", "eval.every_steps=6", "train.checkpoint_every=6",
                       WORKERS)]


@pytest.fixture(scope="module")
def two_node_run(slurm, train_shards, tmp_path_factory):
    """An uninterrupted 2-node x 1-rank training job."""
    d = tmp_path_factory.mktemp("slurm-train")
    job = sbatch("train.sbatch", train_args(train_shards, d / "run"), d,
                 ["--nodes=2", "--ntasks-per-node=1", *CPU_JOB, f"--output={d}/job-%j.log"])
    info = wait(job)
    return d, job, info


def test_two_node_training_job_produces_a_complete_run(two_node_run):
    d, job, info = two_node_run
    log = (d / f"job-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    assert "[rank 1/2]" in log and "2 ranks" in log  # both nodes' ranks ran in one job
    out = d / "run"
    assert sorted(losses(out)) == list(range(1, 13))
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000006", "step-00000012"]
    assert all((out / "checkpoints" / c / "COMPLETE").exists() for c in ckpts)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "vocab.json").exists()
    client = json.loads((out / "checkpoints" / "step-00000012" / "COMPLETE").read_text())
    assert client["world_size"] == 2


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_preemption_checkpoints_requeues_and_resumes_to_the_same_end(two_node_run, train_shards, tmp_path, sig):
    d0, job0, _ = two_node_run
    out = tmp_path / "run"
    job = sbatch("train.sbatch", train_args(train_shards, out), tmp_path,
                 ["--nodes=2", "--ntasks-per-node=1", *CPU_JOB, f"--output={tmp_path}/job-%j.log"])
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and not (metrics.exists() and len(losses(out)) >= 3):
        time.sleep(0.2)
    assert len(losses(out)) >= 3, "the job did not start training"
    # what SLURM does before a time limit (--signal=USR1@120), or at scancel / preemption / the limit
    # (TERM): the signal to every process of the step, ranks, loader forkservers and workers alike
    subprocess.run(["scancel", f"--signal={sig}", str(job)], check=True)
    # SLURM holds a requeued job for about two minutes before it may start again; release it now
    deadline = time.time() + 300
    while time.time() < deadline and job_info(job).get("JobState") not in ("PENDING", "COMPLETED", "FAILED"):
        time.sleep(0.5)
    # ... but not before the nodes have cleaned up the first run and a second has passed: slurmd refuses
    # a job credential made in the same second as the old run's revocation ("Job credential revoked")
    while time.time() < deadline and _nodes_in_state("idle") < 2:
        time.sleep(0.5)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    info = wait(job)
    log = (tmp_path / f"job-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "1", log[-4000:]
    assert "preempted: checkpoint saved, requeueing" in log and "(restart 1)" in log and "resumed from" in log, log[-4000:]
    preempted_at = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert 3 <= preempted_at < 12
    # the same steps, and the same losses, as the uninterrupted job (fp32 on CPU, same world size)
    assert losses(out) == losses(d0 / "run")
    assert (out / "model" / "model.safetensors").exists()


def test_shard_array_job_matches_a_single_build(slurm, corpus_cache, tmp_path):
    cv = corpus_cache("commonvoice", 20)
    single = tmp_path / "single"
    build(BuildOptions(inputs=[cv], output=str(single), shard_size=4, progress=False, max_reject_fraction=1))
    out = tmp_path / "array"
    opts = ["--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--mem=0", "--time=30", f"--output={tmp_path}/shards-%A_%a.log"]
    parts = sbatch("build-shards.sbatch", [str(out), "--input", cv, "--shard-size", "4"], tmp_path, ["--array=0-2", *opts])
    merge = sbatch("build-shards.sbatch", ["--merge", str(out)], tmp_path,
                   [f"--dependency=afterok:{parts}", *opts[:-1], f"--output={tmp_path}/merge-%j.log"])
    info = wait(merge)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part-0", "part-1", "part-2"]

    def samples(root: Path) -> dict[str, str]:
        return {k: json.loads(f["json"])["text"] for t in sorted(root.glob("*.tar")) for k, f in iter_shard(t)}

    assert samples(out) == samples(single) and len(samples(single)) > 0
    tars = sorted(p.name for p in single.glob("*.tar"))
    assert tars == sorted(p.name for p in out.glob("*.tar"))
    assert all((out / t).read_bytes() == (single / t).read_bytes() for t in tars)
