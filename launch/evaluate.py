#!/usr/bin/env python3
"""`torchrun --nproc_per_node N launch/evaluate.py --model DIR --shards DIR` = `asr-dist evaluate …`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asr_dist.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["evaluate", *sys.argv[1:]])
