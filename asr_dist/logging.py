"""Logging set-up: one format for every command, a rank prefix when several processes log."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int = 0, world_size: int = 1, verbose: bool = False) -> None:
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
