#!/usr/bin/env python3
"""Train: `deepspeed launch/train.py --config C.yaml [key=value …]`, also under torchrun, srun and
plain python. The same as `asr-dist train`; all logic lives in asr_dist.engine."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asr_dist.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
