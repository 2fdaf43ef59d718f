#!/usr/bin/env python3
"""Training-loader audio seconds per second from a web server, against local disk in the same run.

One FLAC shard set (synthetic speech, shards of 50) is read by the training loader (micro-batches of 16,
``--workers`` loader workers, two epochs):
  - from local disk with the length plan (each utterance read at its offset): the baseline;
  - from nginx on the loopback interface by ranged GETs (one request per utterance), the same plan;
  - from nginx through the node-local cache (``data.cache_dir``): the first epoch fetches and checks each
    shard, the second reads the cached copies;
  - streamed whole shards from local disk (``data.length_plan=false``): the streaming baseline;
  - streamed from Python's http.server, which gives no byte ranges (the loader's fallback).
The loopback interface has no latency to speak of: these figures are what the HTTP path itself costs.

  python bench/remote_loader.py [--utterances 400] [--workers 2]   -> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from asr_dist.data.loader import TrainLoader  # noqa: E402
from asr_dist.data.shardset import ShardSet  # noqa: E402
from asr_dist.data.writer import BuildOptions, build  # noqa: E402
from servers import NGINX, nginx, python_http  # noqa: E402
from synthetic import make_corpus  # noqa: E402


def speed(shards, workers: int, length_plan: bool) -> dict:
    """Audio seconds per second of each of two epochs, and of both."""
    loader = TrainLoader(shards, rank=0, world_size=1, micro_batch_size=16, global_batch_size=32,
                         num_workers=workers, length_plan=length_plan)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        t0, seconds = time.perf_counter(), 0.0
        for b in loader:
            seconds += float(b["attention_mask"].sum()) / 16000
        epochs.append((seconds, time.perf_counter() - t0))
    return {"audio_seconds_per_second": round(sum(s for s, _ in epochs) / sum(w for _, w in epochs), 1),
            "epoch_audio_seconds_per_second": [round(s / w, 1) for s, w in epochs],
            "length_plan": loader.length_plan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"benchmark": "remote_loader", "utterances": args.utterances, "workers": args.workers,
           "micro_batch_size": 16}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_corpus(tmp / "corpus", args.utterances)
        local = tmp / "www" / "set"
        build(BuildOptions(inputs=[manifest], output=str(local), shard_size=50, progress=False, max_duration=16))
        out["baseline_local_length_plan"] = base = speed(str(local), args.workers, True)
        out["baseline_local_streamed"] = base_s = speed(str(local), args.workers, False)
        if NGINX is not None:
            with nginx(tmp / "www", tmp / "nginx") as url:
                ranged = speed(ShardSet.open(f"{url}/set"), args.workers, True)
                cached = speed(ShardSet.open(f"{url}/set", cache_dir=str(tmp / "cache")), args.workers, True)
            out["nginx_ranged_length_plan"] = ranged
            out["nginx_cache_length_plan"] = cached
            out["ratio_nginx_ranged_vs_local"] = round(ranged["audio_seconds_per_second"]
                                                       / base["audio_seconds_per_second"], 3)
            out["ratio_nginx_cache_warm_epoch_vs_local"] = round(cached["epoch_audio_seconds_per_second"][1]
                                                                 / base["epoch_audio_seconds_per_second"][1], 3)
        else:
            out["nginx"] = "not installed (apt-get install nginx-light): its rows are left out"
        with python_http(tmp / "www") as (url, _):
            plain = speed(ShardSet.open(f"{url}/set"), args.workers, True)  # falls back to streaming
        out["python_http_no_ranges_streamed"] = plain
        out["ratio_python_http_streamed_vs_local_streamed"] = round(plain["audio_seconds_per_second"]
                                                                    / base_s["audio_seconds_per_second"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
