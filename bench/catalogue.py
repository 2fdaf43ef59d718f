#!/usr/bin/env python3
"""Start-up of the length plan: every rank learns each utterance's length and byte offsets before its
first step (``length_plan.Catalogue.list``). From the set's samples.tsv, which the builder writes, that
is one file read; the baseline in the same run is listing every shard (tar headers and each sample's
JSON), what a set built without the table costs.

The set: ``--utterances`` utterances of 0.5 s (a noise clip, hard-linked under a name per utterance;
the plan reads no audio), built by ``shards build`` in shards of 1000.

  python bench/catalogue.py [--utterances 20000]   -> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from asr_dist.data import index as fmt  # noqa: E402
from asr_dist.data.length_plan import Catalogue  # noqa: E402
from asr_dist.data.shardset import ShardSet  # noqa: E402
from asr_dist.data.writer import BuildOptions, build  # noqa: E402


def timed_list(shards: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        Catalogue.list(ShardSet.open(shards))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utterances", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        noise = (0.05 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
        (root / "audio").mkdir()
        for i in range(args.utterances):
            clip = root / f"clip{i // 10000}.wav"  # a file takes at most 65,000 links
            if i % 10000 == 0:
                sf.write(clip, noise, 16000)
            os.link(clip, root / "audio" / f"u{i:07d}.wav")
        (root / "m.jsonl").write_text("".join(json.dumps({"audio_filepath": f"audio/u{i:07d}.wav",
                                                          "text": "hej med dig"}) + "\n"
                                              for i in range(args.utterances)))
        t0 = time.perf_counter()
        build(BuildOptions(inputs=[str(root / "m.jsonl")], output=str(root / "s"), progress=False))
        built = time.perf_counter() - t0
        shards = str(root / "s")
        index = fmt.read_index(shards)
        with_table = timed_list(shards)
        fmt.write_json_atomic(Path(shards) / fmt.INDEX_NAME,
                              {k: v for k, v in index.items() if k != "samples_table"}, indent=1)
        listing = timed_list(shards)
    print(json.dumps({
        "utterances": index["num_samples"], "shards": index["num_shards"],
        "samples_tsv_bytes": index["samples_table"]["bytes"], "build_seconds": round(built, 1),
        "baseline_listing_seconds": round(listing, 3), "samples_tsv_seconds": round(with_table, 3),
        "speedup": round(listing / with_table, 1),
        "microseconds_per_utterance": {"listing": round(1e6 * listing / index["num_samples"], 1),
                                       "samples_tsv": round(1e6 * with_table / index["num_samples"], 1)},
    }, indent=1))


if __name__ == "__main__":
    main()
