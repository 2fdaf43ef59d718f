"""Synthetic training audio for the benchmarks: speech-like noise (band-limited, amplitude-modulated)
of log-normal durations clipped to 1.5-15 s (mean about 5.5 s), 16 kHz, as a NeMo manifest, with
transcripts of about 12 characters per second."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

WORDS = "det regner i københavn jeg drikker en kop kaffe hunden løber over marken vi skal spise middag".split()


def make_corpus(d: Path, n: int, seed: int = 0, median: float = 5.0, low: float = 1.5, high: float = 15.0) -> str:
    """Write ``n`` utterances under ``d`` (log-normal durations around ``median`` seconds, clipped to
    ``low``-``high``); returns the manifest path for `shards build`."""
    rng = np.random.default_rng(seed)
    (d / "audio").mkdir(parents=True)
    lines = []
    for i in range(n):
        seconds = float(np.clip(rng.lognormal(np.log(median), 0.6), low, high))
        t = int(seconds * 16000)
        x = np.convolve(rng.standard_normal(t), np.ones(8) / 8, mode="same")
        x *= 0.2 * (1 + np.sin(np.arange(t) * 2 * np.pi * 4 / 16000))
        sf.write(d / "audio" / f"u{i}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
        text = ""
        while len(text) < 12 * seconds:
            text += rng.choice(WORDS) + " "
        lines.append(json.dumps({"audio_filepath": f"audio/u{i}.wav", "text": text.strip()}, ensure_ascii=False))
    (d / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(d / "m.jsonl")
