#!/usr/bin/env python3
"""Entry script: `python shards/build.py ARGS` is `asr-dist shards build ARGS`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asr_dist.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["shards", "build", *sys.argv[1:]])
