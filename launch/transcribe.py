#!/usr/bin/env python3
"""`python launch/transcribe.py --model DIR AUDIO…` = `asr-dist transcribe …`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asr_dist.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["transcribe", *sys.argv[1:]])
