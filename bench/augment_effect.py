#!/usr/bin/env python3
"""Does augmentation help, and does checkpoint averaging? The demo's tiny model, recipe and corpus.

The demo's synthesised Danish corpus (eSpeak NG voices, three layouts and rates) trains the tiny wav2vec2
with the demo's recipe the same number of steps twice: without augmentation (the baseline) and with the
``augment`` section below
(speed perturbation, noise from recordings of white and pink noise, a telephone line). Each run is scored
on the held-out sentences three ways: as synthesised (clean), with noise it never heard (brown noise and
mains hum at 5-15 dB SNR), and over a telephone line (G.711 A-law, where training used mu-law); each with
its final weights and with the mean of its last 3 checkpoints (``asr-dist average``).

  python bench/augment_effect.py [--steps 600] [--out DIR]   -> one JSON object on stdout (about 20 min on 2 cores)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402

from asr_dist.average import average, last_checkpoints  # noqa: E402
from asr_dist.data.augment import Augmentation, scan_recordings  # noqa: E402
from asr_dist.data.writer import BuildOptions, build  # noqa: E402
from asr_dist.decode import evaluate_model  # noqa: E402
from asr_dist.demo import synthesise_corpora  # noqa: E402


def coloured_noise(rng, seconds: float, exponent: float, rate: int = 16000) -> np.ndarray:
    """Noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown), at unit RMS."""
    n = int(seconds * rate)
    spectrum = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.maximum(np.fft.rfftfreq(n, 1 / rate), 20.0)
    x = np.fft.irfft(spectrum / f ** (exponent / 2), n)
    return (x / np.sqrt(np.mean(x ** 2))).astype(np.float32)


def noise_dirs(root: Path) -> tuple[Path, Path]:
    """Training noise (white and pink) and noise training never hears (brown, and a 50 Hz hum with harmonics)."""
    rng = np.random.default_rng(0)
    train, unseen = root / "noise-train", root / "noise-unseen"
    train.mkdir(parents=True)
    unseen.mkdir(parents=True)
    for i in range(3):
        sf.write(train / f"white{i}.wav", 0.1 * coloured_noise(rng, 20, 0.0), 16000)
        sf.write(train / f"pink{i}.wav", 0.1 * coloured_noise(rng, 20, 1.0), 16000)
    t = np.arange(20 * 16000) / 16000
    hum = sum(np.sin(2 * np.pi * 50 * k * t + k) / k for k in range(1, 8)).astype(np.float32)
    sf.write(unseen / "brown.wav", 0.1 * coloured_noise(rng, 20, 2.0), 16000)
    sf.write(unseen / "hum.wav", 0.1 * hum / np.sqrt(np.mean(hum ** 2)), 16000)
    return train, unseen


def condition_set(held_out_tsv: str, condition: Augmentation, out: Path, vocab: Path) -> str:
    """The held-out corpus with ``condition`` applied to every utterance, as a shard set."""
    rows = list(csv.DictReader(open(held_out_tsv, encoding="utf-8"), delimiter="\t"))
    clips = Path(held_out_tsv).parent / "clips"
    (out / "audio").mkdir(parents=True)
    lines = []
    for r in rows:
        audio, rate = sf.read(clips / r["path"], dtype="float32")
        audio = soxr.resample(audio, rate, 16000).astype(np.float32)
        changed, _ = condition(audio, r["path"], 0)
        sf.write(out / "audio" / f"{Path(r['path']).stem}.wav", np.clip(changed, -1, 1), 16000, subtype="PCM_16")
        lines.append(json.dumps({"audio_filepath": f"audio/{Path(r['path']).stem}.wav", "text": r["sentence"]},
                                ensure_ascii=False))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shards = out / "shards"
    build(BuildOptions(inputs=[str(out / "manifest.jsonl")], output=str(shards), shard_size=100, progress=False,
                       vocab=str(vocab), max_reject_fraction=0.5))
    return str(shards)


def train(run: Path, shards: Path, eval_dir: str, steps: int, augment: list[str]) -> float:
    args = [sys.executable, str(REPO / "launch" / "train.py"), "--config",
            str(REPO / "asr_dist" / "resources" / "demo.yaml"), f"output_dir={run}", f"data.train_shards=[{shards}]",
            f"data.eval_shards.dev={eval_dir}", f"train.max_steps={steps}",
            f"optim.warmup_steps={min(300, steps // 3)}", f"train.checkpoint_every={steps // 6}",
            "train.keep_checkpoints=3", "train.log_every=100", *augment]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    t0 = time.time()
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training {run} failed:\n{r.stderr[-3000:]}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--utterances", type=int, default=1200)
    ap.add_argument("--out", help="keep everything here (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        inputs, held_out = synthesise_corpora(root, args.utterances, rebuild=False)
        shards = root / "shards" / "train"
        build(BuildOptions(inputs=inputs, output=str(shards), shard_size=100, progress=False, overwrite=True))
        vocab = shards / "vocab.json"
        for d in ("noise", "eval-clean", "eval-noise", "eval-phone"):  # made again: the same seeds, the same files
            shutil.rmtree(root / d, ignore_errors=True)
        train_noise, unseen = noise_dirs(root / "noise")
        sets = {
            "clean": condition_set(held_out, Augmentation(), root / "eval-clean", vocab),
            "unseen_noise_5_15db": condition_set(held_out, Augmentation(
                noise=scan_recordings(str(unseen), "noise"), noise_prob=1.0, noise_snr_db=(5.0, 15.0)),
                root / "eval-noise", vocab),
            "telephone_alaw": condition_set(held_out, Augmentation(telephone_prob=1.0, telephone_codec="alaw"),
                                            root / "eval-phone", vocab),
        }
        recipe = ["augment.speed_prob=0.5", f"augment.noise_dir={train_noise}", "augment.noise_prob=0.5",
                  "augment.noise_snr_db=[5,20]", "augment.telephone_prob=0.1", "augment.telephone_codec=ulaw"]
        out = {"benchmark": "augment_effect", "steps": args.steps, "utterances": args.utterances,
               "augment": " ".join(recipe).replace(str(train_noise), "white+pink"), "runs": {}}
        # the demo's recipe turns speed perturbation on: the baseline turns it off
        for name, extra in (("baseline", ["augment.speed_prob=0"]), ("augmented", recipe)):
            run = root / f"run-{name}"
            done = (run / "model" / "model.safetensors").exists()  # with --out: a finished run is reused
            seconds = None if done else train(run, shards, sets["clean"], args.steps, extra)
            paths, what = last_checkpoints(run, 3)
            averaged = average(paths, root / f"avg-{name}", what)
            scores = {}
            for model_name, model in (("final", run / "model"), ("average_last_3", averaged)):
                for set_name, s in sets.items():
                    r = evaluate_model(str(model), s, progress=False, num_workers=0)
                    scores[f"{model_name}/{set_name}"] = {"wer": round(r["wer"], 4), "cer": round(r["cer"], 4)}
            out["runs"][name] = {"train_seconds": None if seconds is None else round(seconds), **scores}
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
