"""The benchmarks keep working (tiny sizes on CPU); their figures are read by people, not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the compiled variants are left to the GPU (inductor on 2 CPU cores takes minutes; tests/test_config.py
# checks that compiled layers train like eager ones)
TRAIN_VARIANTS = ["baseline_plain_loop", "baseline_hf_trainer", "asr_dist_zero2", "asr_dist_seed_fast",
                  "plain_loop_bucketed_32x1_repeat4", "asr_dist_large_seconds_fp32", "profile_seed_fast"]


@pytest.mark.parametrize("script, args, key", [
    ("shards.py", ["--utterances", "40", "--repeats", "1"], "builder"),
    ("loader.py", ["--utterances", "64"], "padding_fraction"),
    ("kernel_levers.py", ["--batch", "1", "--seconds", "1", "1.5", "--repeats", "1"], "positional_conv"),
    ("train_throughput.py", ["--utterances", "64", "--steps", "2", "--warmup", "1", "--zero", "2", "--large-seconds", "30",
                             "--only", *TRAIN_VARIANTS], "variants"),
])
def test_benchmark_prints_json(script, args, key):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                         timeout=600, env={**env, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{\n"):])  # libraries may print dicts on one line before it
    assert key in result
    if script == "kernel_levers.py":  # the fused blocks and the FFT convolution compute what the eager ones do
        fe, pc = result["feature_encoder"], result["positional_conv"]
        assert fe["max_abs_difference"] < 1e-3 and len(fe["lengths"]) == 2, result
        assert pc["max_relative_difference_fft"] < 1e-4 and pc["fft_ms"] > 0 and pc["speedup_fft"] > 0, result
    if script == "train_throughput.py":
        assert set(result["variants"]) == set(TRAIN_VARIANTS), result["variants"]
        profiled = result["variants"].pop("profile_seed_fast")
        shares = [k["share"] for k in profiled["top"]]  # rounded to 0.001: the smallest may show 0
        assert shares and shares[0] > 0 and all(0 <= x <= 1 for x in shares) and sum(shares) <= 1.01, profiled
        assert all(v["audio_seconds_per_second"] > 0 for v in result["variants"].values()), result["variants"]
        assert result["variants"]["asr_dist_seed_fast"]["ratio_vs_plain_loop"] > 0
        assert len(result["variants"]["plain_loop_bucketed_32x1_repeat4"]["step_ms"]) == 2  # one per measured step
