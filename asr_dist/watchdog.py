"""Progress watchdog: a rank that makes no optimizer step for too long is hung; say where, and stop.

  main thread  ── step ── step_done() ── step ── step_done() ── … (evaluation, saves: paused())
  watchdog thread, every rank, every few seconds:
      idle = time since the last step_done()
      idle > max(floor_s, factor x median step time)  ──> trip
      another rank's trip mark in the job's store     ──> trip too
  trip: the Python stacks of every thread of this rank (faulthandler) to the log, the frame the main
        thread waits in named, the mark set for the other ranks (they dump theirs), exit EXIT_HUNG.

The heartbeat (asr_dist.distributed) finds ranks that are gone; this finds ranks that are still
there but stuck: in a collective whose peer waits elsewhere, in a loader that never delivers, in a
deadlock. Without it such a rank waits for the collective timeout and ends without a word of where.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback

log = logging.getLogger(__name__)

EXIT_HUNG = 77  # this rank stopped because the job made no progress; its log holds every thread's stack
TRIP_KEY = "asr_dist/watchdog/tripped"


def waiting_frame(thread_id: int) -> str:
    """Where a thread is now: its innermost Python frame, and the innermost one in asr_dist when that
    is another (the call into the library that waits)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "(the thread has ended)"
    stack = traceback.extract_stack(frame)
    inner = stack[-1]
    text = f"{inner.name} ({inner.filename}:{inner.lineno})"
    ours = next((f for f in reversed(stack) if f"{os.sep}asr_dist{os.sep}" in f.filename), None)
    if ours is not None and ours is not inner:
        text += f", called from {ours.name} (asr_dist{ours.filename.rsplit(os.sep + 'asr_dist', 1)[1]}:{ours.lineno})"
    return text


def all_stacks() -> str:
    """faulthandler's dump of every thread's Python stack, as text (for the log, not only stderr)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


class Watchdog:
    """Trips when no optimizer step came for ``max(floor_s, factor x median step time)`` seconds.

    Armed by the first ``step_done()`` (the first step compiles and warms up: no median yet);
    the median is over the last ``window`` steps. ``paused()`` covers evaluation and saves, which
    are not optimizer steps; the clock restarts after them. ``store``: the job's rendezvous store
    (None for one process), through which a trip on one rank makes every rank dump its stacks."""

    def __init__(self, rank: int, world_size: int, factor: float, floor_s: float, store=None, window: int = 50,
                 on_trip=None):
        self.rank, self.world = rank, world_size
        self.factor, self.floor_s = float(factor), float(floor_s)
        self.interval = min(5.0, max(0.2, self.floor_s / 10))
        self.store = store
        self.on_trip = on_trip or self._exit
        self.tripped: str | None = None
        self._main = threading.get_ident()  # the thread whose steps are watched
        self._steps: collections.deque = collections.deque(maxlen=window)
        self._last: float | None = None
        self._paused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asr-dist-watchdog", daemon=True)
        self._thread.start()

    # ── the main thread ──

    def step_done(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self._steps.append(now - self._last)
        self._last = now

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self._last is not None:
                self._last = time.monotonic()  # the pause is not a step's time

    def stop(self, wait: float = 10.0) -> None:
        """Stop watching, and wait (up to ``wait`` seconds) for the thread to leave its store call (see
        Heartbeat.stop: a daemon thread that returns from C++ while the interpreter finalizes aborts the process)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(wait)

    # ── the watchdog thread ──

    def limit(self) -> tuple[float, float]:
        """(seconds without a step that trip it, the median step time it is made of)."""
        median = statistics.median(self._steps) if self._steps else 0.0
        return max(self.floor_s, self.factor * median), median

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            other = self._other_trip()
            if other is not None:
                self._trip(f"rank {self.rank} stops with it: {other}", first=False)
                return
            last = self._last
            if last is None or self._paused:
                continue
            idle = time.monotonic() - last
            limit, median = self.limit()
            if idle > limit:
                self._trip(f"rank {self.rank} of {self.world} made no optimizer step for {idle:.0f} s (the limit is "
                           f"{limit:.0f} s: {self.factor:g} x the median step time {median:.2f} s, at least "
                           f"distributed.watchdog_floor_s {self.floor_s:g} s)", first=True)
                return

    def _other_trip(self) -> str | None:
        if self.store is None:
            return None
        try:
            if self.store.check([TRIP_KEY]):
                return self.store.get(TRIP_KEY).decode()
        except Exception:  # the store is gone: the heartbeat reports that
            return None
        return None

    def _trip(self, why: str, first: bool) -> None:
        if self._stop.is_set():
            return
        where = waiting_frame(self._main)
        message = f"{why}; its main thread waits in {where}" if first else f"{why}; this rank waits in {where}"
        self.tripped = message
        log.error("watchdog: %s. Python stacks of every thread of rank %d (most recent call first):\n%s",
                  message, self.rank, all_stacks())
        if first and self.store is not None:
            try:
                self.store.set(TRIP_KEY, message)
            except Exception:
                pass
        self.on_trip(message, first)

    def _exit(self, message: str, first: bool) -> None:
        if first and self.store is not None:
            # the others poll the mark every interval; this rank may hold the store: stay until they have read it
            time.sleep(2 * self.interval + 1)
        log.error("watchdog: %s. Stopping rank %d (exit %d); every rank's stacks are in its log. Restart the job to "
                  "resume from the last complete checkpoint.", message, self.rank, EXIT_HUNG)
        logging.shutdown()
        os._exit(EXIT_HUNG)
