"""The benchmarks keep working (tiny sizes on CPU): each runs, prints one JSON object with the figures it
promises, and shows the effects that are not about speed.

Speeds themselves are read by people (bench/README.md), never asserted: on 2 shared CPU cores a tiny run's
figures are noise. What holds at any speed is asserted: bucketing lowers padding, the large-batch mode fills
micro-batches more evenly, fused and FFT kernels compute what eager ones do, synchronised buckets and the
length plan balance the ranks' work.
"""

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
# the baselines and one variant of each kind (asr-dist, a bucketed plain loop, a profile): each trains in
# its own process, and the other variants are the same code with other settings
TRAIN_VARIANTS = ["baseline_plain_loop", "baseline_hf_trainer", "asr_dist_seed_fast",
                  "plain_loop_bucketed_32x1_repeat4", "profile_seed_fast"]


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=600, env={**env, "DS_ACCELERATOR": "cpu"})


def run_bench(script: str, *args: str) -> dict:
    out = bench(script, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{\n"):])  # libraries may print dicts on one line before it


def positive(*figures) -> bool:
    """Every figure is a number above 0 (a speed, a time: measured, not left out or zero)."""
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in figures)


def test_shards_benchmark_times_the_builder_per_worker_count():
    r = run_bench("shards.py", "--utterances", "40", "--repeats", "1")
    assert r["utterances"] == 40 and positive(r["audio_seconds"], r["baseline_bare_work_1_process"]["x_real_time"])
    builder = r["builder"]
    assert set(builder) == {"1", "2"}, builder
    for n, b in builder.items():
        assert b["workers"] == int(n)
        assert positive(b["wall_seconds"], b["x_real_time"], b["x_real_time_per_worker"], b["speedup_vs_1_worker"],
                        b["ratio_vs_bare_work"]), b


def test_catalogue_benchmark_reads_every_utterance_both_ways():
    r = run_bench("catalogue.py", "--utterances", "1500")
    assert (r["utterances"], r["shards"]) == (1500, 2) and r["samples_tsv_bytes"] > 1500 * 40
    assert positive(r["build_seconds"], r["baseline_listing_seconds"], r["samples_tsv_seconds"], r["speedup"],
                    *r["microseconds_per_utterance"].values()), r
    assert set(r["microseconds_per_utterance"]) == {"listing", "samples_tsv"}


def test_remote_loader_benchmark_reads_from_web_servers_against_local_disk():
    r = run_bench("remote_loader.py", "--utterances", "32", "--workers", "1")
    rows = ["baseline_local_length_plan", "baseline_local_streamed", "python_http_no_ranges_streamed"]
    if "nginx" not in r:  # nginx is installed: its ranged and cached rows are there
        rows += ["nginx_ranged_length_plan", "nginx_cache_length_plan"]
        assert r["nginx_ranged_length_plan"]["length_plan"] and r["nginx_cache_length_plan"]["length_plan"]
        assert positive(r["ratio_nginx_ranged_vs_local"], r["ratio_nginx_cache_warm_epoch_vs_local"])
    for row in rows:
        assert positive(r[row]["audio_seconds_per_second"], *r[row]["epoch_audio_seconds_per_second"]), row
    assert not r["python_http_no_ranges_streamed"]["length_plan"]  # no ranges: the loader fell back to streaming
    assert positive(r["ratio_python_http_streamed_vs_local_streamed"])


@pytest.mark.slow  # builds and decodes two shard sets several times (about 20 s)
def test_loader_benchmark_shows_bucketing_cuts_padding_and_seconds_fill_evenly():
    # 128 utterances: a buffer holds at most what an epoch's share takes, so from 8 micro-batches of 16 on
    # every bucket size holds the whole epoch and pads alike; bucketing still cuts padding 4x
    r = run_bench("loader.py", "--utterances", "128")
    for fmt in ("flac", "wav"):
        f = r[fmt]
        assert positive(f["baseline_soundfile_decode_x_real_time"], f["loader_1_stream"]["audio_seconds_per_second"],
                        f["loader_2_workers"]["audio_seconds_per_second"], f["loader_2_workers"]["per_worker"],
                        f["ratio_1_stream_vs_bare_decode"]), f
    planned = r["flac"]["loader_1_stream_length_plan"]
    assert positive(planned["audio_seconds_per_second"], r["flac"]["ratio_length_plan_vs_streamed"])
    assert planned["listing_seconds"] >= 0
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
    assert by_seconds["padded_seconds_max"] <= 240  # the budget, padding included
    assert by_seconds["mean_over_max_padded"] >= fixed["mean_over_max_padded"]  # memory used more evenly
    assert by_seconds["audio_seconds_mean"] > fixed["audio_seconds_mean"]  # 240 s hold more than 16 utterances
    aug = r["augmentation_flac_1_stream"]
    assert set(aug) == {"plain_1_stream", "speed", "noise", "rir", "lowpass", "telephone_ulaw", "telephone_gsm", "gain",
                        "recipe_mix"}
    assert positive(aug["plain_1_stream"], *(v["audio_seconds_per_second"] for k, v in aug.items() if k != "plain_1_stream"))
    assert fill["audio_per_micro_batch_ratio"] > 1


@pytest.mark.slow  # compiles the fused blocks with inductor
def test_kernel_levers_compute_what_the_eager_blocks_do():
    r = run_bench("kernel_levers.py", "--batch", "1", "--seconds", "1", "1.5", "--repeats", "1")
    fe, pc = r["feature_encoder"], r["positional_conv"]
    assert fe["max_abs_difference"] < 1e-3 and [x["seconds"] for x in fe["lengths"]] == [1, 1.5], r
    assert pc["max_relative_difference_fft"] < 1e-4 and [x["seconds"] for x in pc["lengths"]] == [1, 1.5], r
    assert positive(fe["eager_ms"], fe["fused_ms"], fe["speedup"], *(x[k] for x in fe["lengths"]
                                                                     for k in ("eager_ms", "fused_ms"))), fe
    ways = ("direct_ms", "direct_cudnn_benchmark_ms", "fft_ms")
    assert positive(*(pc[k] for k in ways), pc["speedup_fft"], pc["speedup_cudnn_benchmark"],
                    *(x[k] for x in pc["lengths"] for k in ways)), pc
    rk = r["relative_key_bias"]  # w2v-BERT's bias both ways: the same numbers
    assert rk["max_abs_difference"] < 1e-4 and positive(rk["transformers_ms"], rk["per_distance_ms"], rk["speedup"]), rk


def test_train_throughput_names_its_variants_and_refuses_unknown_ones():
    listed = bench("train_throughput.py", "--list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    names = [line.split(":")[0] for line in listed.stdout.splitlines()]
    assert set(TRAIN_VARIANTS) <= set(names), names
    wrong = bench("train_throughput.py", "--only", "baseline_plain_loop", "no_such_variant")
    assert wrong.returncode != 0 and "unknown variant(s) ['no_such_variant']" in wrong.stderr, wrong.stderr[-3000:]
    # every variant gpu-check.sh asks for is one the script names with gpu-check's flags (names say no precision,
    # so the list on this machine is the GPU's)
    import re

    script = (REPO / "bench" / "gpu-check.sh").read_text()
    asked = re.search(r"--only \$\{VARIANTS:-([^}]*)\}", script).group(1).replace("\\", " ").split()
    asked += re.findall(r"--only (\w+)\s", script)
    listed = bench("train_throughput.py", "--list", "--large-micro", "0")
    names = {line.split(":")[0] for line in listed.stdout.splitlines()}
    assert len(asked) >= 10 and set(asked) <= names, set(asked) - names


@pytest.mark.slow  # trains every variant in its own process
def test_train_throughput_variants_run():
    r = run_bench("train_throughput.py", "--utterances", "64", "--steps", "2", "--warmup", "1", "--zero", "2",
                  "--large-seconds", "30", "--only", *TRAIN_VARIANTS)
    variants = r["variants"]
    assert set(variants) == set(TRAIN_VARIANTS) and not [v for v in variants.values() if "error" in v], variants
    profiled = variants.pop("profile_seed_fast")
    shares = [k["share"] for k in profiled["top"]]  # rounded to 0.001: the smallest may show 0
    assert shares and shares[0] > 0 and all(0 <= x <= 1 for x in shares) and sum(shares) <= 1.01, profiled
    for name, v in variants.items():
        assert positive(v["audio_seconds_per_second"], v["ratio_vs_plain_loop"], v["ratio_vs_hf_trainer"]), (name, v)
        if "windows" in v:  # asr-dist variants: the logged windows the figure is the median of
            assert len(v["windows"]) >= 1 and positive(*v["windows"]), (name, v)
            assert 0 <= v["data_wait_fraction"] <= 1, (name, v)
    # an epoch's shapes and padding as its loader forms them (packed variants add their capacities)
    padded = variants["asr_dist_seed_fast"]
    assert padded["shapes_per_epoch"] >= 1 and 0 <= padded["padding_fraction"] < 1, padded
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
        assert positive(w["gain_padded"], w["gain_padded_plan"])
        assert w["distinct_utterances_sync"] == sync["utterances_per_epoch"] == sync["steps"] * 32
        # the length plan: a step's ranks hold neighbouring lengths, closer than synchronised buckets
        plan = w["plan"]
        assert plan["slowest_over_mean_padded"] < sync["slowest_over_mean_padded"] and plan["steps"] == sync["steps"], w
        assert w["distinct_utterances_plan"] == plan["utterances_per_epoch"] == sync["utterances_per_epoch"]
        for row in (sync, alone, plan):
            assert row["slowest_over_mean_flops"] >= row["slowest_over_mean_padded"] - 1e-3
    assert r["worlds"]["8x4"]["sync"]["slowest_over_mean_padded"] < 1.3
    assert r["worlds"]["8x4"]["plan"]["slowest_over_mean_padded"] < 1.05
    assert "plan" not in r["large_batch_8_ranks"]  # the length plan takes a fixed utterance count only
