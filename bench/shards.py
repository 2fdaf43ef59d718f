#!/usr/bin/env python3
"""Shard-builder throughput: audio seconds built per second of wall time, per worker count.

Input: synthesised Danish speech as 22.05 kHz 16-bit WAV in a Common Voice layout; output: 16 kHz
FLAC shards. The baseline in the same run is the bare per-item work (read, decode, soxr to 16 kHz,
FLAC encode) in one process without the builder around it.

  python bench/shards.py [--utterances 2000] [--workers 1 2]   -> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import soundfile as sf  # noqa: E402
import soxr  # noqa: E402

from asr_dist.data.writer import BuildOptions, build  # noqa: E402
from asr_dist.synth import write_corpus  # noqa: E402


def bare_work(tsv: Path) -> tuple[float, float]:
    """(audio seconds, wall seconds) of read + decode + resample + encode, nothing else."""
    clips = sorted((tsv.parent / "clips").iterdir())
    t0 = time.perf_counter()
    seconds = 0.0
    for p in clips:
        audio, sr = sf.read(io.BytesIO(p.read_bytes()), dtype="float32")
        seconds += len(audio) / sr
        y = soxr.resample(audio, sr, 16000, quality="HQ")
        buf = io.BytesIO()
        sf.write(buf, y, 16000, format="FLAC", subtype="PCM_16")
    return seconds, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs per worker count")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(write_corpus(Path(tmp) / "corpus", "commonvoice", args.utterances, seed=1, sample_rate=22050))
        bare_seconds, bare_wall = min((bare_work(tsv) for _ in range(args.repeats)), key=lambda r: r[1])
        results = {
            "benchmark": "shards_build",
            "input": "22.05 kHz 16-bit WAV, Common Voice TSV",
            "output": "16 kHz FLAC",
            "utterances": args.utterances,
            "audio_seconds": round(bare_seconds, 1),
            "cpus": len(os.sched_getaffinity(0)),
            "baseline_bare_work_1_process": {"x_real_time": round(bare_seconds / bare_wall, 1)},
            "builder": {},
        }
        for w in args.workers:
            best = None
            for r in range(args.repeats):
                out = Path(tmp) / f"out-{w}-{r}"
                t0 = time.perf_counter()
                s = build(BuildOptions(inputs=[str(tsv)], output=str(out), workers=w, progress=False, shard_size=200))
                wall = time.perf_counter() - t0
                best = wall if best is None else min(best, wall)
            results["builder"][str(w)] = {
                "workers": w,
                "wall_seconds": round(best, 3),
                "x_real_time": round(s.audio_seconds / best, 1),
                "x_real_time_per_worker": round(s.audio_seconds / best / w, 1),
            }
        one = results["builder"].get("1")
        for w, r in results["builder"].items():
            if one:
                r["speedup_vs_1_worker"] = round(r["x_real_time"] / one["x_real_time"], 2)
            r["ratio_vs_bare_work"] = round(r["x_real_time"] / results["baseline_bare_work_1_process"]["x_real_time"], 2)
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
