"""The progress watchdog in one process: its bound (K x median step time, with a floor), its pause,
and the frame it names."""

from __future__ import annotations

import threading
import time

from asr_dist.watchdog import Watchdog


def _watch(**kw):
    trips: list[tuple[str, float]] = []
    done = threading.Event()

    def on_trip(message, first):
        trips.append((message, time.monotonic()))
        done.set()

    return Watchdog(0, 1, on_trip=on_trip, **kw), trips, done


def test_trips_after_factor_times_the_median_step_naming_the_frame():
    dog, trips, done = _watch(factor=4, floor_s=0.5)
    for _ in range(6):  # steps of 0.2 s: the limit is max(0.5, 4 x 0.2) = 0.8 s
        time.sleep(0.2)
        dog.step_done()
    last = time.monotonic()
    assert dog.limit()[0] == 4 * dog.limit()[1] and 0.75 < dog.limit()[0] < 1.0
    assert done.wait(5)
    dog.stop()
    message, at = trips[0]
    assert 0.8 <= at - last < 0.8 + 2 * dog.interval + 0.3, at - last
    assert "made no optimizer step for" in message and "the median step time 0.20 s" in message
    assert "its main thread waits in wait (" in message and "threading.py:" in message  # in Event.wait


def test_not_armed_before_the_first_step_nor_while_paused():
    dog, trips, done = _watch(factor=2, floor_s=0.3)
    assert not done.wait(0.8)  # no step yet: start-up is not watched
    dog.step_done()
    with dog.paused():
        assert not done.wait(0.8)  # an evaluation or a save
    dog.step_done()
    assert done.wait(2)  # the floor: 0.3 s without a step
    dog.stop()
