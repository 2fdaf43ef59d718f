"""The benchmarks keep working (tiny sizes on CPU); their figures are read by people, not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, args, key", [
    ("shards.py", ["--utterances", "40", "--repeats", "1"], "builder"),
    ("loader.py", ["--utterances", "64"], "padding_fraction"),
    ("train_throughput.py", ["--utterances", "64", "--steps", "2", "--warmup", "1", "--zero", "2", "--large-micro", "16"],
     "variants"),
])
def test_benchmark_prints_json(script, args, key):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                         timeout=600, env={**env, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{\n"):])  # libraries may print dicts on one line before it
    assert key in result
    if script == "train_throughput.py":
        assert all(v["audio_seconds_per_second"] > 0 for v in result["variants"].values())
        assert {"baseline_plain_loop", "baseline_hf_trainer", "asr_dist_zero2", "asr_dist_large_batch_fp32"} == \
            set(result["variants"])
