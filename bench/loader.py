#!/usr/bin/env python3
"""Training-loader throughput and padding.

Per audio format (FLAC, WAV): audio seconds delivered per second by one loader stream (read from the
tar, decode, normalise, encode labels, pad into micro-batches of 16), with the bare soundfile decode
of the same bytes in the same run as the baseline (the bound); for FLAC also with ``length_plan``
(every utterance read at its offset, after listing every shard), against the streamed reader. Then the padding fraction of
micro-batches with and without length bucketing on a log-normal duration mix of 1.5 to 15 s, and how
evenly micro-batches fill memory: a fixed utterance count against the large-batch mode
(``data.micro_batch_seconds``: as many utterances as fit in that many seconds, padding included), whose
budget is the fixed count's largest micro-batch (16 x 15 s). And what augmentation (the ``augment`` section)
costs one loader stream, each kind on every utterance and a recipe's mix, against the plain stream.

  python bench/loader.py [--utterances 400] [--workers 2]   -> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from asr_dist.data import index as fmt  # noqa: E402
from asr_dist.data.batching import default_bucket_batches  # noqa: E402
from asr_dist.data.loader import TrainLoader  # noqa: E402
from asr_dist.data.writer import BuildOptions, build  # noqa: E402
from synthetic import make_corpus  # noqa: E402


def bare_decode(shards: str, ext: str) -> float:
    """Audio seconds per second of soundfile alone on the shards' audio bytes."""
    blobs = [f[ext] for s in sorted(Path(shards).glob("shard-*.tar")) for _, f in fmt.iter_shard(s)]
    t0 = time.perf_counter()
    seconds = 0.0
    for b in blobs:
        a, sr = sf.read(io.BytesIO(b), dtype="float32")
        seconds += len(a) / sr
    return seconds / (time.perf_counter() - t0)


def loader_speed(shards: str, workers: int, epochs: int = 2, length_plan: bool = False, augment=None) -> dict:
    t0 = time.perf_counter()
    loader = TrainLoader(shards, rank=0, world_size=1, micro_batch_size=16, global_batch_size=32,
                         num_workers=workers, length_plan=length_plan, augment=augment)
    if length_plan:  # the listing of every shard happens once, before the first epoch: timed on its own
        next(iter(loader.plan()))
    listing = time.perf_counter() - t0
    seconds, wall = 0.0, 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for b in loader:
            seconds += float(b["attention_mask"].sum()) / 16000
        wall += time.perf_counter() - t0
    out = {"audio_seconds_per_second": round(seconds / wall, 1), "per_worker": round(seconds / wall / max(1, workers), 1)}
    if length_plan:
        out["listing_seconds"] = round(listing, 2)
    return out


def augmentation_cost(shards: str, tmp: Path) -> dict:
    """One loader stream's audio s/s with each kind of augmentation on every utterance, and with a mix of them
    at the probabilities of a typical recipe, against the plain stream in the same run."""
    import numpy as np

    from asr_dist.data.augment import Augmentation, scan_recordings

    rng = np.random.default_rng(0)
    for d in ("noise", "rir"):
        (tmp / d).mkdir()
    for i in range(4):  # 30 s noise recordings at 16 and 44.1 kHz; 0.5 s impulse responses
        rate = (16000, 44100)[i % 2]
        sf.write(tmp / "noise" / f"n{i}.wav", (0.1 * rng.standard_normal(30 * rate)).astype("float32"), rate)
        h = rng.standard_normal(8000) * np.exp(-np.arange(8000) / 1500)
        h[0] = 4.0
        sf.write(tmp / "rir" / f"r{i}.wav", (h / 4).astype("float32"), 16000)
    noise, rir = scan_recordings(str(tmp / "noise"), "noise"), scan_recordings(str(tmp / "rir"), "rir")
    kinds = {
        "speed": dict(speed_prob=1.0), "noise": dict(noise=noise, noise_prob=1.0), "rir": dict(rir=rir, rir_prob=1.0),
        "lowpass": dict(lowpass_prob=1.0), "telephone_ulaw": dict(telephone_prob=1.0),
        "telephone_gsm": dict(telephone_prob=1.0, telephone_codec="gsm"), "gain": dict(gain_prob=1.0),
        # a recipe: speed on half, noise on 0.7 (CoRal's background noise), reverberation on 0.3, a phone line on 0.1
        "recipe_mix": dict(speed_prob=0.5, noise=noise, noise_prob=0.7, rir=rir, rir_prob=0.3, telephone_prob=0.1,
                           gain_prob=0.3),
    }
    plain = loader_speed(shards, 0, epochs=1)["audio_seconds_per_second"]
    out = {"plain_1_stream": plain}
    for name, settings in kinds.items():
        speed = loader_speed(shards, 0, epochs=1, augment=Augmentation(**settings))["audio_seconds_per_second"]
        out[name] = {"audio_seconds_per_second": speed, "ratio_vs_plain": round(speed / plain, 3)}
    return out


def batch_samples(loader: TrainLoader) -> list[tuple[int, int, int]]:
    """(padded samples, audio samples, utterances) of every micro-batch of one epoch."""
    return [(b["attention_mask"].numel(), int(b["attention_mask"].sum()), len(b["keys"])) for b in loader]


def padding(shards: str, bucket_batches: int) -> float:
    rows = batch_samples(TrainLoader(shards, rank=0, world_size=1, micro_batch_size=16, global_batch_size=32,
                                     num_workers=0, bucket_batches=bucket_batches))
    return round(1 - sum(r[1] for r in rows) / sum(r[0] for r in rows), 4)


def fill(shards: str, **mode) -> dict:
    """Padded and audio seconds per micro-batch over one epoch (a micro-batch's memory follows its padded size)."""
    rows = batch_samples(TrainLoader(shards, rank=0, world_size=1, num_workers=0, bucket_batches=8, **mode))
    padded, audio, sizes = ([r[0] / 16000 for r in rows], [r[1] / 16000 for r in rows], [r[2] for r in rows])
    n = len(rows)
    return {"micro_batches": n, "utterances_min_max": [min(sizes), max(sizes)],
            "padded_seconds_mean": round(sum(padded) / n, 1), "padded_seconds_max": round(max(padded), 1),
            "audio_seconds_mean": round(sum(audio) / n, 1),
            "mean_over_max_padded": round(sum(padded) / n / max(padded), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-augment", dest="augment", action="store_false",
                    help="leave out the cost of each kind of augmentation (data.augment) per loader stream")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"benchmark": "loader", "utterances": args.utterances, "micro_batch_size": 16}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_corpus(Path(tmp) / "corpus", args.utterances)
        for ext in ("flac", "wav"):
            shards = str(Path(tmp) / ext)
            build(BuildOptions(inputs=[manifest], output=shards, audio_format=ext, shard_size=50, progress=False,
                               max_duration=16))
            bound = bare_decode(shards, ext)
            one = loader_speed(shards, 0)
            many = loader_speed(shards, args.workers)
            out[ext] = {
                "baseline_soundfile_decode_x_real_time": round(bound, 1),
                "loader_1_stream": one,
                f"loader_{args.workers}_workers": many,
                "ratio_1_stream_vs_bare_decode": round(one["audio_seconds_per_second"] / bound, 3),
            }
            if ext == "flac":  # data.length_plan: every utterance read at its offset instead of whole shards in order
                planned = loader_speed(shards, 0, length_plan=True)
                out[ext]["loader_1_stream_length_plan"] = planned
                out[ext]["ratio_length_plan_vs_streamed"] = round(planned["audio_seconds_per_second"]
                                                                  / one["audio_seconds_per_second"], 3)
        shards = str(Path(tmp) / "flac")
        if args.augment:
            out["augmentation_flac_1_stream"] = augmentation_cost(shards, Path(tmp))
        out["padding_fraction"] = {f"bucket_batches_{n}" + (" (no bucketing)" if n == 1 else ""): padding(shards, n)
                                   for n in (1, 8, 32, 64)}
        out["default_bucket_batches"] = default_bucket_batches(16)  # at micro-batches of 16
        fixed = fill(shards, micro_batch_size=16, global_batch_size=16)
        by_seconds = fill(shards, micro_batch_size=16, global_batch_size=16, micro_batch_seconds=240,
                          global_batch_seconds=240)
        out["large_batch_fill"] = {"fixed_16_utterances": fixed, "micro_batch_seconds_240": by_seconds,
                                   "audio_per_micro_batch_ratio": round(by_seconds["audio_seconds_mean"]
                                                                        / fixed["audio_seconds_mean"], 2)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
