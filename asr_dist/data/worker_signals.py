"""Data loader processes ignore SIGUSR1, and die with the process that started them. SLURM delivers
--signal=USR1@T (and `scancel --signal=USR1`) to every process of a job step, the loader's forkserver
and workers included; the default action would kill them, and the rank would then die on "DataLoader
worker exited unexpectedly" instead of saving at its next step. Only the rank's main process acts on
it (asr_dist.engine.Preemption). SIGTERM keeps its default: multiprocessing ends workers with it
(ignoring it hung a rank at exit, joining a worker that would not end).

The loader's forkserver imports asr_dist.data.forkserver_preload at its start (multiprocessing's
forkserver preload), which calls ``ignore_preemption_signals``, so every worker forked from it
inherits the dispositions; the function is also each DataLoader's worker_init_fn, for workers
started another way."""

import os
import signal

PREEMPTION_SIGNALS = (signal.SIGUSR1,)
PR_SET_PDEATHSIG = 1


def ignore_preemption_signals(_worker_id: int | None = None) -> None:
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent ends. A rank that is killed (or ends through
    os._exit after losing a peer) would otherwise leave its forkserver and workers behind for good:
    the workers' own watchdog watches their parent, the forkserver, which outlives the rank."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the workers' watchdog still ends them with the forkserver
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(0)

