"""Data loader processes ignore SIGUSR1, take SIGTERM only from their rank, and die with the process
that started them. SLURM delivers --signal=USR1@T (and `scancel --signal=USR1`) to every process of a
job step, the loader's forkserver and workers included, and SIGTERM likewise at a time limit, at
`scancel` and at preemption; the default actions would kill them, and the rank would then die on
"DataLoader worker exited unexpectedly" instead of saving at its next step. Only the rank's main
process acts on them (asr_dist.engine.Preemption). A worker still ends on a SIGTERM from its rank:
multiprocessing and the DataLoader stop workers that way (a worker that ignored every SIGTERM hung
its rank at exit, joining a worker that would not end), so a worker waits for SIGTERM in a thread
and looks at who sent it.

The loader's forkserver imports asr_dist.data.forkserver_preload at its start (multiprocessing's
forkserver preload), which calls ``ignore_preemption_signals``, so every worker forked from it
inherits the dispositions; each DataLoader's worker_init_fn is ``loader_worker_init``, which does
the same for workers started another way and adds the SIGTERM check."""

import os
import signal
import threading
from pathlib import Path

PREEMPTION_SIGNALS = (signal.SIGUSR1,)
# blocked while the forkserver and the resource tracker start: they keep them blocked (a blocked
# signal stays blocked across exec) and so does every worker forked from the forkserver
BLOCKED_AT_START = (signal.SIGUSR1, signal.SIGTERM)
PR_SET_PDEATHSIG = 1
OWNER_ENV = "ASR_DIST_LOADER_OWNER"  # the rank's pid, for its forkserver (set before it starts)


def ignore_preemption_signals(owner: int | None = None) -> None:
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if owner is None and os.environ.get(OWNER_ENV, "").isdigit():
        owner = int(os.environ[OWNER_ENV])
    die_with_parent(owner)


def die_with_parent(owner: int | None = None) -> None:
    """Linux: SIGKILL this process when its parent ends. A rank that is killed (or ends through
    os._exit after losing a peer) would otherwise leave its forkserver and workers behind for good:
    the workers' own watchdog watches their parent, the forkserver, which outlives the rank.

    The parent may already be gone when this runs (a worker forked just before the rank, and so its
    forkserver, were killed: it is then a child of init, and measured, it waited forever), so after
    setting the signal it checks that it still has a parent and that ``owner`` (the rank) lives."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the workers' watchdog still ends them with the forkserver
    if os.getppid() == 1 or (owner is not None and not _alive(owner)):
        os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed rank its launcher has not reaped yet is a zombie
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def loader_worker_init(owner: int, worker_id: int) -> None:
    """A DataLoader worker's init function (with ``functools.partial(loader_worker_init, os.getpid())``
    in the rank): ignore the preemption signals, die with the parent, take SIGTERM from ``owner`` only."""
    ignore_preemption_signals(owner)
    terminate_only_from(owner)


def terminate_only_from(owner: int) -> None:
    """SIGTERM ends this process only when ``owner`` (the rank) or the process itself sends it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid in (owner, os.getpid()):
                os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-rank", daemon=True).start()


def worker_context():
    """The forkserver for loader workers. It preloads the module that makes it (and so every worker
    forked from it) ignore the preemption signals meant for the rank and die with the rank; it and
    multiprocessing's resource tracker are started with those signals blocked (a blocked signal stays
    blocked across exec, and a handled one would revert to its deadly default there)."""
    import multiprocessing
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "asr_dist.data.forkserver_preload"])
    os.environ[OWNER_ENV] = str(os.getpid())  # the forkserver's preload checks that its rank still lives
    # Python 3.11's forkserver ignores the sys.path it is handed: let it find asr_dist to preload it
    root = str(Path(__file__).resolve().parents[2])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, root]))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(BLOCKED_AT_START))
    try:
        multiprocessing.resource_tracker.ensure_running()  # it ignores TERM itself, and unblocks TERM here
        signal.pthread_sigmask(signal.SIG_BLOCK, set(BLOCKED_AT_START))
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return ctx
