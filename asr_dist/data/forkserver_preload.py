"""Imported only by the data loader's forkserver, at its start: see worker_signals."""

from .worker_signals import ignore_preemption_signals

ignore_preemption_signals()
