"""The benchmarks keep working (tiny sizes on CPU) and show what each exists to show.

Speeds themselves are read by people (bench/README.md), never asserted: on 2 shared CPU cores a tiny run's
figures are noise. What holds at any speed is asserted: each ratio agrees with the figures it divides,
each per-worker figure with its total, and the effects that are not about speed (bucketing lowers padding,
the large-batch mode fills micro-batches more evenly, fused and FFT kernels compute what eager ones do).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the compiled variants are left to the GPU (inductor on 2 CPU cores takes minutes; tests/test_config.py
# checks that compiled layers train like eager ones)
# the baselines and one variant of each kind (asr-dist, a bucketed plain loop, a profile): each trains in
# its own process, and the other variants are the same code with other settings
TRAIN_VARIANTS = ["baseline_plain_loop", "baseline_hf_trainer", "asr_dist_seed_fast",
                  "plain_loop_bucketed_32x1_repeat4", "profile_seed_fast"]


def run_bench(script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                         timeout=600, env={**env, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{\n"):])  # libraries may print dicts on one line before it


def ratio(a: float, b: float) -> float:
    return a / b


def test_shards_benchmark_ratios_agree_with_its_figures():
    r = run_bench("shards.py", "--utterances", "40", "--repeats", "1")
    assert r["utterances"] == 40 and r["audio_seconds"] > 0
    bare, builder = r["baseline_bare_work_1_process"]["x_real_time"], r["builder"]
    one = builder["1"]["x_real_time"]
    assert set(builder) == {"1", "2"}, builder
    for n, b in builder.items():
        assert b["workers"] == int(n)
        # x real time is the corpus' audio over the wall time (rounded to 1 ms, hence the tolerance)
        assert b["x_real_time"] == pytest.approx(r["audio_seconds"] / b["wall_seconds"], rel=0.03), b
        assert b["x_real_time_per_worker"] == pytest.approx(b["x_real_time"] / b["workers"], abs=0.1), b
        assert b["speedup_vs_1_worker"] == pytest.approx(ratio(b["x_real_time"], one), abs=0.01), b
        assert b["ratio_vs_bare_work"] == pytest.approx(ratio(b["x_real_time"], bare), abs=0.01), b


def test_catalogue_benchmark_reads_every_utterance_both_ways():
    r = run_bench("catalogue.py", "--utterances", "1500")
    assert (r["utterances"], r["shards"]) == (1500, 2) and r["samples_tsv_bytes"] > 1500 * 40
    for name, key in (("listing", "baseline_listing_seconds"), ("samples_tsv", "samples_tsv_seconds")):
        assert r["microseconds_per_utterance"][name] == pytest.approx(1e6 * r[key] / 1500, abs=1.0)
    assert r["speedup"] == pytest.approx(ratio(r["baseline_listing_seconds"], r["samples_tsv_seconds"]), rel=0.2)


@pytest.mark.slow  # builds and decodes two shard sets several times (about 20 s)
def test_loader_benchmark_shows_bucketing_cuts_padding_and_seconds_fill_evenly():
    # 128 utterances: a buffer holds at most what an epoch's share takes, so from 8 micro-batches of 16 on
    # every bucket size holds the whole epoch and pads alike; bucketing still cuts padding 4x
    r = run_bench("loader.py", "--utterances", "128")
    for fmt in ("flac", "wav"):
        f = r[fmt]
        one, bare = f["loader_1_stream"]["audio_seconds_per_second"], f["baseline_soundfile_decode_x_real_time"]
        assert f["ratio_1_stream_vs_bare_decode"] == pytest.approx(ratio(one, bare), abs=2e-3)
        two = f["loader_2_workers"]
        assert two["per_worker"] == pytest.approx(two["audio_seconds_per_second"] / 2, abs=0.1)
    planned = r["flac"]["loader_1_stream_length_plan"]
    assert planned["audio_seconds_per_second"] > 0 and planned["listing_seconds"] >= 0
    assert r["flac"]["ratio_length_plan_vs_streamed"] == pytest.approx(
        ratio(planned["audio_seconds_per_second"], r["flac"]["loader_1_stream"]["audio_seconds_per_second"]), abs=2e-3)
    pad = list(r["padding_fraction"].values())  # no bucketing, then ever larger buckets
    assert list(r["padding_fraction"])[0].startswith("bucket_batches_1 ")
    assert pad[0] > 0.2 and pad == sorted(pad, reverse=True), r["padding_fraction"]
    default = r["padding_fraction"][f"bucket_batches_{r['default_bucket_batches']}"]
    assert default < pad[0] / 4, r["padding_fraction"]
    fill = r["large_batch_fill"]
    fixed, by_seconds = fill["fixed_16_utterances"], fill["micro_batch_seconds_240"]
    assert fixed["utterances_min_max"] == [16, 16]
    for m in (fixed, by_seconds):
        assert m["audio_seconds_mean"] <= m["padded_seconds_mean"] <= m["padded_seconds_max"], m
        assert m["mean_over_max_padded"] == pytest.approx(m["padded_seconds_mean"] / m["padded_seconds_max"], abs=2e-3)
    assert by_seconds["padded_seconds_max"] <= 240  # the budget, padding included
    assert by_seconds["mean_over_max_padded"] >= fixed["mean_over_max_padded"]  # memory used more evenly
    assert fill["audio_per_micro_batch_ratio"] == pytest.approx(
        ratio(by_seconds["audio_seconds_mean"], fixed["audio_seconds_mean"]), abs=0.02)
    assert fill["audio_per_micro_batch_ratio"] > 1


@pytest.mark.slow  # compiles the fused blocks with inductor
def test_kernel_levers_compute_what_the_eager_blocks_do():
    r = run_bench("kernel_levers.py", "--batch", "1", "--seconds", "1", "1.5", "--repeats", "1")
    fe, pc = r["feature_encoder"], r["positional_conv"]
    assert fe["max_abs_difference"] < 1e-3 and len(fe["lengths"]) == 2, r
    assert pc["max_relative_difference_fft"] < 1e-4 and len(pc["lengths"]) == 2, r
    # the summary figures are the means over the lengths, and the speedups their ratios (rounded to 0.01 ms)
    for block, keys in ((fe, ("eager_ms", "fused_ms")), (pc, ("direct_ms", "direct_cudnn_benchmark_ms", "fft_ms"))):
        for k in keys:
            assert block[k] == pytest.approx(statistics.mean(x[k] for x in block["lengths"]), abs=0.02), (k, block)
    # each speedup is the ratio of the per-length sums (the means are rounded, so they cannot give it
    # to 0.001 when a block takes a few hundredths of a millisecond), itself rounded to 0.001
    def total(block, k):
        return sum(x[k] for x in block["lengths"])

    assert fe["speedup"] == pytest.approx(ratio(total(fe, "eager_ms"), total(fe, "fused_ms")), abs=6e-4)
    assert pc["speedup_fft"] == pytest.approx(ratio(total(pc, "direct_ms"), total(pc, "fft_ms")), abs=6e-4)
    assert pc["speedup_cudnn_benchmark"] == pytest.approx(
        ratio(total(pc, "direct_ms"), total(pc, "direct_cudnn_benchmark_ms")), abs=6e-4)


@pytest.mark.slow  # trains every variant in its own process
def test_train_throughput_variants_run_and_their_ratios_agree():
    r = run_bench("train_throughput.py", "--utterances", "64", "--steps", "2", "--warmup", "1", "--zero", "2",
                  "--large-seconds", "30", "--only", *TRAIN_VARIANTS)
    variants = r["variants"]
    assert set(variants) == set(TRAIN_VARIANTS) and not [v for v in variants.values() if "error" in v], variants
    profiled = variants.pop("profile_seed_fast")
    shares = [k["share"] for k in profiled["top"]]  # rounded to 0.001: the smallest may show 0
    assert shares and shares[0] > 0 and all(0 <= x <= 1 for x in shares) and sum(shares) <= 1.01, profiled
    plain, trainer = (variants[n]["audio_seconds_per_second"] for n in ("baseline_plain_loop", "baseline_hf_trainer"))
    for name, v in variants.items():
        assert v["audio_seconds_per_second"] > 0, (name, v)
        # each ratio is the variant's figure over the baseline's, both measured in this run
        a = v["audio_seconds_per_second"]
        assert v["ratio_vs_plain_loop"] == pytest.approx(ratio(a, plain), rel=0.01, abs=2e-3), (name, v)
        assert v["ratio_vs_hf_trainer"] == pytest.approx(ratio(a, trainer), rel=0.01, abs=2e-3), (name, v)
        if "windows" in v:  # asr-dist variants: the figure is the median of the logged windows
            assert v["audio_seconds_per_second"] == pytest.approx(statistics.median(v["windows"]), abs=0.1), (name, v)
            assert 0 <= v["data_wait_fraction"] <= 1, (name, v)
    assert variants["baseline_plain_loop"]["ratio_vs_plain_loop"] == 1.0
    bucketed = variants["plain_loop_bucketed_32x1_repeat4"]
    assert len(bucketed["step_ms"]) == 2  # one per measured step
    # the bucketed loop pads less than the baseline's random batches (what bucketing is for)
    assert bucketed["padding_fraction"] < variants["baseline_plain_loop"]["padding_fraction"], variants


@pytest.mark.slow
def test_rank_balance_benchmark_shows_synchronised_steps_wait_less():
    """Counts of work, not timings: on every world size synchronised buckets leave the slowest rank
    closer to the mean than each rank shuffling alone (8 ranks: measured 1.16 against 1.96 on 320
    utterances), with the same padding (the same buffers, another order); every rank's utterances of an
    epoch are distinct; the FLOPs estimate weighs long micro-batches more, so it is not below the padded one."""
    r = run_bench("rank_balance.py", "--utterances", "320", "--worlds", "1", "2", "8", "--shard-size", "8")
    one = r["worlds"]["1x32"]
    assert one["sync"]["slowest_over_mean_padded"] == one["no_sync"]["slowest_over_mean_padded"] == 1.0
    assert one["plan"]["slowest_over_mean_padded"] == 1.0
    for name in ("2x16", "8x4"):
        w = r["worlds"][name]
        sync, alone = w["sync"], w["no_sync"]
        assert sync["slowest_over_mean_padded"] < alone["slowest_over_mean_padded"], w
        assert sync["padding"] == alone["padding"] and sync["steps"] == alone["steps"]
        assert w["gain_padded"] == pytest.approx(ratio(alone["slowest_over_mean_padded"],
                                                       sync["slowest_over_mean_padded"]), abs=2e-3)
        assert w["distinct_utterances_sync"] == sync["utterances_per_epoch"] == sync["steps"] * 32
        # the length plan: a step's ranks hold neighbouring lengths, closer than synchronised buckets
        plan = w["plan"]
        assert plan["slowest_over_mean_padded"] < sync["slowest_over_mean_padded"] and plan["steps"] == sync["steps"], w
        assert w["gain_padded_plan"] == pytest.approx(ratio(alone["slowest_over_mean_padded"],
                                                            plan["slowest_over_mean_padded"]), abs=2e-3)
        assert w["distinct_utterances_plan"] == plan["utterances_per_epoch"] == sync["utterances_per_epoch"]
        for row in (sync, alone, plan):
            assert row["slowest_over_mean_flops"] >= row["slowest_over_mean_padded"] - 1e-3
    assert r["worlds"]["8x4"]["sync"]["slowest_over_mean_padded"] < 1.3
    assert r["worlds"]["8x4"]["plan"]["slowest_over_mean_padded"] < 1.05
    assert "plan" not in r["large_batch_8_ranks"]  # the length plan takes a fixed utterance count only
