"""Synthetic Danish speech for tests and the demo: eSpeak NG through the espeakng-loader wheel
(which ships libespeak-ng and its voice data; no system package, no download).

  sentence ──espeak_Synth (voice da+variant, rate, pitch)──> int16 22050 Hz ──> float32 (T,)

libespeak-ng keeps global state and is not thread-safe: one synthesiser per process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import random
from importlib import resources

import numpy as np

SYNTH_RATE = 22050  # eSpeak NG's native output rate
VARIANTS = ("f2", "m3", "f4", "m1", "f1", "m2", "f3", "m4")

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclasses.dataclass(frozen=True)
class Voice:
    variant: str = "f2"  # eSpeak NG voice variant appended to "da"
    rate: int = 170  # words per minute (eSpeak's default is 175)
    pitch: int = 50  # 0-100


class Synthesizer:
    """Danish text to 22.05 kHz float32 speech."""

    _lib = None

    def __init__(self):
        if Synthesizer._lib is None:
            import espeakng_loader

            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
            if rate != SYNTH_RATE:
                raise RuntimeError(f"espeak_Initialize failed or returned an unexpected rate ({rate})")
            lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            Synthesizer._lib = lib
        self._chunks: list[np.ndarray] = []
        self._cb = _CALLBACK(self._collect)  # kept alive as long as the synthesiser
        self._lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def __call__(self, text: str, voice: Voice = Voice()) -> np.ndarray:
        lib = self._lib
        if lib.espeak_SetVoiceByName(f"da+{voice.variant}".encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice da+{voice.variant}")
        lib.espeak_SetParameter(_RATE, voice.rate, 0)
        lib.espeak_SetParameter(_PITCH, voice.pitch, 0)
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        if lib.espeak_Synth(data, len(data), 0, 0, 0, _CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak_Synth failed for {text!r}")
        lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return audio.astype(np.float32) / 32768.0


def danish_sentences() -> list[str]:
    """The Danish sentences the project ships (one per line in resources/sentences_da.txt)."""
    text = resources.files("asr_dist").joinpath("resources/sentences_da.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def random_voice(rng: random.Random) -> Voice:
    return Voice(variant=rng.choice(VARIANTS), rate=rng.randint(140, 200), pitch=rng.randint(30, 70))


LAYOUTS = ("commonvoice", "commonvoice-release", "nemo", "audiofolder", "kaldi", "hf-hub")
GENDERS = ("female_feminine", "male_masculine", "")
AGES = ("twenties", "thirties", "fifties", "")
DIALECTS = ("Sjællandsk", "Fynsk", "Sønderjysk", "Nordjysk")
# the Hub layout's audio: codec and rate cycle over the rows, so one corpus holds all of them
HUB_CODECS = (("FLAC", 16000), ("WAV", 44100), ("MP3", 48000), ("FLAC", 22050), ("MP3", 32000), ("WAV", 8000))


def write_corpus(out_dir, layout: str, num: int, seed: int = 0, sample_rate: int = SYNTH_RATE,
                 channels: int = 1, audio_format: str = "wav", sentences: list[str] | None = None,
                 prefix: str | None = None) -> str:
    """Synthesise ``num`` utterances as a corpus in one of the builder's input layouts.

    Returns the path to give ``asr-dist shards build --input``. Sentences, voices, speeds and
    pitches are drawn from ``seed``; audio is written at ``sample_rate`` with ``channels`` channels
    (the same signal in each).

    "commonvoice-release" is a release's language directory (cv-corpus-1/da: train, dev, test,
    validated and other TSVs with the demographic columns, clips/); "hf-hub" a Hugging Face dataset
    repository as downloaded: README.md with the card's ``configs:`` (subset "default" with splits
    train, in two parquet files, and test under data/; subset "extra" under extra/), audio embedded
    as FLAC, WAV and MP3 at the rates of ``HUB_CODECS``, row groups of 4 rows."""
    if layout == "hf-hub":
        return _write_hub(out_dir, num, seed, sentences, prefix)
    import csv
    import json
    from pathlib import Path

    import soundfile as sf
    import soxr

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = Path(out_dir)
    if layout == "commonvoice-release":
        out = out / "cv-corpus-1" / "da"
    audio_dir = out / {"commonvoice": "clips", "commonvoice-release": "clips", "nemo": "audio", "audiofolder": "",
                       "kaldi": "wav"}[layout]
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sentences = sentences or danish_sentences()
    synth = Synthesizer()
    prefix = prefix or layout
    rows = []
    for i in range(num):
        text = rng.choice(sentences)
        audio = synth(text, random_voice(rng))
        if sample_rate != SYNTH_RATE:
            audio = soxr.resample(audio, SYNTH_RATE, sample_rate, quality="HQ")
        if channels > 1:
            audio = np.stack([audio] * channels, axis=1)
        name = f"{prefix}_{i:05d}.{audio_format}"
        sf.write(audio_dir / name, audio, sample_rate, subtype="PCM_16" if audio_format in ("wav", "flac") else None)
        rows.append((name, text, len(audio) / sample_rate, f"spk{i % 7}"))
    if layout == "commonvoice-release":
        cols = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
                "gender", "accents", "variant", "locale", "segment")
        table = [(spk, name, f"s{i}", text, "", "2", "0", AGES[i % len(AGES)], GENDERS[i % len(GENDERS)],
                  DIALECTS[i % len(DIALECTS)] if i % 5 else "", "", "da", "")
                 for i, (name, text, _, spk) in enumerate(rows)]
        n_test = max(1, num // 5)
        parts = {"train": table[:num - 2 * n_test], "dev": table[num - 2 * n_test:num - n_test],
                 "test": table[num - n_test:], "validated": table, "other": []}
        for split, part in parts.items():
            with open(out / f"{split}.tsv", "w", encoding="utf-8") as f:
                f.write("\t".join(cols) + "\n")
                f.writelines("\t".join(r) + "\n" for r in part)
        return str(out)
    if layout == "commonvoice":
        with open(out / "train.tsv", "w", encoding="utf-8") as f:
            f.write("client_id\tpath\tsentence\n")
            f.writelines(f"{spk}\t{name}\t{text}\n" for name, text, _, spk in rows)
        return str(out / "train.tsv")
    if layout == "nemo":
        with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
            for name, text, dur, _ in rows:
                f.write(json.dumps({"audio_filepath": f"audio/{name}", "text": text, "duration": dur}, ensure_ascii=False) + "\n")
        return str(out / "manifest.jsonl")
    if layout == "audiofolder":
        with open(out / "metadata.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "transcription"])
            w.writerows((name, text) for name, text, _, _ in rows)
        return str(out)
    with open(out / "wav.scp", "w") as scp, open(out / "text", "w", encoding="utf-8") as txt, open(out / "utt2spk", "w") as u2s:
        for name, text, _, spk in rows:
            utt = name.rsplit(".", 1)[0]
            scp.write(f"{utt} wav/{name}\n")
            txt.write(f"{utt} {text}\n")
            u2s.write(f"{utt} {spk}\n")
    return str(out)


def recombine(sentences: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` new word sequences of 3 to 9 words drawn from ``sentences``' words: more varied
    character contexts than the sentences themselves, so a small model learns spelling, not sentences."""
    rng = random.Random(seed)
    words = sorted({w for s in sentences for w in s.replace(",", " ").replace(".", " ").replace("?", " ").split()})
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _write_hub(out_dir, num: int, seed: int, sentences: list[str] | None, prefix: str | None) -> str:
    import io
    from pathlib import Path

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    import soxr

    out = Path(out_dir)
    rng = random.Random(seed)
    sentences = sentences or danish_sentences()
    synth = Synthesizer()
    prefix = prefix or "hub"
    rows = []
    for i in range(num):
        text = rng.choice(sentences)
        audio = synth(text, random_voice(rng))
        codec, rate = HUB_CODECS[i % len(HUB_CODECS)]
        audio = soxr.resample(audio, SYNTH_RATE, rate, quality="HQ")
        buf = io.BytesIO()
        sf.write(buf, audio, rate, format=codec, subtype="PCM_16" if codec != "MP3" else None)
        rows.append({"audio": {"bytes": buf.getvalue(), "path": f"{prefix}_{i:05d}.{codec.lower()}"}, "text": text,
                     "speaker_id": f"spk{i % 7}", "gender": GENDERS[i % len(GENDERS)] or None,
                     "age": 20 + i % 4 * 10, "dialect": DIALECTS[i % len(DIALECTS)]})
    # the datasets schema (Audio feature in the parquet metadata), as push_to_hub writes it; the table is
    # made with pyarrow, because datasets' Audio encoder needs torchcodec even for ready bytes
    features = datasets.Features({"audio": datasets.Audio(), "text": datasets.Value("string"),
                                  "speaker_id": datasets.Value("string"), "gender": datasets.Value("string"),
                                  "age": datasets.Value("int32"), "dialect": datasets.Value("string")})
    n_test = max(1, num // 4)
    train, test = rows[:num - n_test], rows[num - n_test:]
    half = (len(train) + 1) // 2
    files = {"data/train-00000-of-00002.parquet": train[:half], "data/train-00001-of-00002.parquet": train[half:],
             "data/test-00000-of-00001.parquet": test, "extra/train-00000-of-00001.parquet": rows[:3]}
    for name, part in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(part, schema=features.arrow_schema)
        pq.write_table(table, out / name, row_group_size=4)
    (out / "README.md").write_text(
        "---\nlicense: cc0-1.0\nconfigs:\n- config_name: default\n  default: true\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n  - split: test\n    path: data/test-*\n"
        "- config_name: extra\n  data_files:\n  - split: train\n    path: extra/*.parquet\n---\n"
        "# Synthetic Danish speech\n", encoding="utf-8")
    return str(out)
