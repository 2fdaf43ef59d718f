#!/usr/bin/env python3
"""How evenly the ranks of a data-parallel step share its work: alone, with synchronised buckets, with the length plan.

In a step every rank waits for the slowest. Every rank's training loader of one epoch runs in this
process (``TrainLoader.plan``: the real batch forming, reading the shards' JSON, decoding no audio),
for world sizes 1 to 64, on a log-normal 1.5-15 s mix of real shards. Per step and rank, the work is
the padded audio of its micro-batches (utterances x longest); per world size:

  slowest_over_mean_padded   sum over steps of the slowest rank's padded audio / the mean rank's: the
                             share of time lost to waiting, before any communication (1.0 = none)
  slowest_over_mean_flops    the same for a step-time estimate in training FLOPs (asr_dist.flops at the
                             XLS-R-300M layout, attention quadratic in length, feature encoder frozen)
  padding                    padded samples that hold no audio, over all padded samples
  utterances_per_epoch       utterances delivered in the epoch, all ranks; distinct_utterances of them

The baseline in the same run is the same loader with ``sync_buckets=False`` (each rank shuffles its
own buffer); then ``sync_buckets=True`` (the default: the ranks take the same length quantile of their own
buffers) and ``length_plan=True`` (``data.length_plan``: the epoch planned from every utterance's length,
so a step's ranks hold neighbours). The large-batch mode (``data.micro_batch_seconds``) is measured at 8
ranks, without and with synchronised buckets (the length plan does not take it).

  python bench/rank_balance.py [--utterances 3438] [--worlds 1 2 4 8 16 32 64]   -> JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402

from asr_dist.models.presets import PRESETS  # noqa: E402
from asr_dist.data.loader import TrainLoader  # noqa: E402
from asr_dist.data.writer import BuildOptions, build  # noqa: E402
from asr_dist.flops import train_flops  # noqa: E402
from synthetic import make_corpus  # noqa: E402


def rank_plans(shards: str, world: int, **loader) -> list[list[list[int]]]:
    """[rank][micro-batch] -> utterance lengths (samples) of one epoch, every rank's loader in this process."""
    return [[b["num_samples"] for b in TrainLoader(shards, rank=r, world_size=world, **loader).plan()]
            for r in range(world)]


def balance(plans: list[list[list[int]]], accumulation: int, model_config) -> dict:
    world = len(plans)
    counts = {len(p) for p in plans}
    assert len(counts) == 1, f"ranks ran different numbers of micro-batches: {counts}"
    flops_cache: dict[int, float] = {}

    def flops(n: int) -> float:  # one utterance padded to n samples
        if n not in flops_cache:
            flops_cache[n] = train_flops(model_config, n, frozen_feature_encoder=True)
        return flops_cache[n]

    padded_max = padded_mean = flops_max = flops_mean = 0.0
    padded_total = audio_total = 0
    step_ratios = []
    for s in range(counts.pop() // accumulation):
        padded = [0] * world
        work = [0.0] * world
        for r in range(world):
            for lengths in plans[r][s * accumulation:(s + 1) * accumulation]:
                longest = max(lengths)
                padded[r] += len(lengths) * longest
                work[r] += len(lengths) * flops(longest)
                audio_total += sum(lengths)
        padded_total += sum(padded)
        padded_max += max(padded)
        padded_mean += sum(padded) / world
        flops_max += max(work)
        flops_mean += sum(work) / world
        step_ratios.append(max(padded) / (sum(padded) / world))
    step_ratios.sort()
    return {"steps": len(step_ratios),
            "slowest_over_mean_padded": round(padded_max / padded_mean, 4),
            "slowest_over_mean_flops": round(flops_max / flops_mean, 4),
            "median_step_slowest_over_mean_padded": round(step_ratios[len(step_ratios) // 2], 4),
            "padding": round(1 - audio_total / padded_total, 4)}


MODES = {"no_sync": dict(sync_buckets=False), "sync": dict(sync_buckets=True),
         "plan": dict(sync_buckets=True, length_plan=True)}


def measure(shards: str, world: int, model_config, modes=tuple(MODES), **loader) -> dict:
    out = {}
    for name in modes:
        first = TrainLoader(shards, rank=0, world_size=world, **MODES[name], **loader)
        plans = rank_plans(shards, world, **MODES[name], **loader)
        keys = [len(b) for p in plans for b in p]
        row = balance(plans, first.accumulation, model_config)
        row["utterances_per_epoch"] = sum(keys)
        row["bucket_batches"] = first.bucket_batches
        out[name] = row
    base = out["no_sync"]["slowest_over_mean_padded"]
    out["gain_padded"] = round(base / out["sync"]["slowest_over_mean_padded"], 3)
    if "plan" in out:
        out["gain_padded_plan"] = round(base / out["plan"]["slowest_over_mean_padded"], 3)
    return out


def distinct(shards: str, world: int, **loader) -> int:
    keys = set()
    for r in range(world):
        for b in TrainLoader(shards, rank=r, world_size=world, **loader).plan():
            keys.update(b["keys"])
    return len(keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=3438)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--global-batch", type=int, default=32, help="utterances per step (at least one per rank)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers per rank (readers: ranks x workers)")
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--large-seconds", type=float, default=60, help="the large-batch mode's micro-batch, 8 ranks")
    args = ap.parse_args()
    model_config = transformers.AutoConfig.for_model("wav2vec2", **PRESETS["xlsr-300m"])
    t0 = time.perf_counter()
    out = {"benchmark": "rank_balance", "utterances": args.utterances, "loader_workers": args.workers,
           "durations": "log-normal, median 5 s, clipped to 1.5-15 s", "flops_model": "xlsr-300m", "worlds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_corpus(Path(tmp) / "corpus", args.utterances)
        shards = str(Path(tmp) / "shards")
        build(BuildOptions(inputs=[manifest], output=shards, shard_size=args.shard_size, progress=False,
                           max_duration=16))
        for world in args.worlds:
            global_batch = max(args.global_batch, world)
            micro = global_batch // world
            loader = dict(micro_batch_size=micro, global_batch_size=global_batch, num_workers=args.workers)
            row = {"micro_batch_size": micro, "global_batch_size": global_batch, **measure(shards, world, model_config,
                                                                                          **loader)}
            row["distinct_utterances_sync"] = distinct(shards, world, sync_buckets=True, **loader)
            row["distinct_utterances_plan"] = distinct(shards, world, length_plan=True, **loader)
            out["worlds"][f"{world}x{micro}"] = row
        seconds = dict(micro_batch_size=1, global_batch_size=8, num_workers=args.workers,
                       micro_batch_seconds=args.large_seconds, global_batch_seconds=8 * args.large_seconds)
        out["large_batch_8_ranks"] = {"micro_batch_seconds": args.large_seconds,
                                      **measure(shards, 8, model_config, modes=("no_sync", "sync"), **seconds)}
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
