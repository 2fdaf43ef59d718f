"""Audio augmentation in the loader workers: speed, room, noise, channel and gain, drawn per utterance.

  decoded 16 kHz audio of utterance KEY in epoch E
  ──speed perturbation (resampled: length and pitch change; Kaldi's and NeMo's)──> round(n / factor) samples
  ──reverberation (an impulse response of augment.rir_dir, aligned on its direct path)──>
  ──additive noise (a stretch of a recording of augment.noise_dir, at an SNR drawn from its range)──>
  ──band limiting (a low-pass by resampling) or a telephone channel (8 kHz, 300-3400 Hz, G.711 or GSM 6.10
    through libsndfile)──>
  ──gain in dB (clipped to [-1, 1]: what a hot microphone does)──> the featuriser (asr_dist.data.samples)

Every choice is drawn from (seed, epoch, key) alone, never from a generator that runs on: the same utterance
in the same epoch is changed the same way on any rank, worker or resume. The speed factor is drawn on its
own, so the loader knows each utterance's length in an epoch before reading it (``length``): the length
plan, buckets, packing capacities and the alignment check all see the perturbed length, which equals the
delivered one exactly.

Written on numpy, soxr and soundfile rather than audiomentations: its transforms draw from Python's and
numpy's global generators, which cannot be keyed by utterance without reseeding process state, and its speed
change does not promise the exact output length the plan needs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..audio import SAMPLE_RATE
from ..errors import UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
CODECS = {"ulaw": ("WAV", "ULAW"), "alaw": ("WAV", "ALAW"), "gsm": ("WAV", "GSM610"), "none": None}
RIR_MAX_SECONDS = 4.0  # longer impulse responses are cut: their tails are below any noise floor


class AugmentError(UserError, ValueError):
    """An augmentation setting or directory that cannot work; the message names it and what to change."""


def _uniforms(seed: int, epoch: int, key: str, what: str, n: int = 2) -> list[float]:
    """``n`` numbers in [0, 1) that depend only on their arguments (blake2b, 8 bytes each)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{what}/{key}".encode(), digest_size=8 * n).digest()
    return [int.from_bytes(digest[8 * i:8 * i + 8], "little") / 2.0**64 for i in range(n)]


def _generator(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}/{epoch}/draws/{key}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def stretched(num_samples: int, factor: float) -> int:
    """Samples of an utterance of ``num_samples`` played at ``factor`` times its speed."""
    return num_samples if factor == 1.0 else max(1, int(round(num_samples / factor)))


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` cut or zero-padded to exactly ``n`` samples (resamplers round the length their own way)."""
    if len(x) >= n:
        return x[:n]
    return np.concatenate([x, np.zeros(n - len(x), dtype=x.dtype)])


def _resample(x: np.ndarray, rate_in: float, rate_out: float, n: int) -> np.ndarray:
    return _fit(soxr.resample(x, rate_in, rate_out).astype(np.float32), n)


@dataclasses.dataclass(frozen=True)
class Recording:
    path: str
    frames: int
    sample_rate: int


@functools.lru_cache(maxsize=16)  # the config is checked when read and again when the run is planned
def scan_recordings(directory: str, key: str) -> tuple[Recording, ...]:
    """Every audio file under ``directory`` (recursively), with its length and rate from its header;
    an empty, missing or unreadable directory, or a file that does not open, is refused naming it."""
    root = Path(directory)
    if not root.is_dir():
        raise AugmentError(f"{key}={directory}: no such directory; give a directory of noise or impulse-response "
                           f"recordings (WAV, FLAC, …), or leave {key} out")
    try:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    except OSError as e:
        raise AugmentError(f"{key}={directory}: the directory cannot be read ({e})") from None
    if not paths:
        raise AugmentError(f"{key}={directory}: no audio files in it ({', '.join(AUDIO_SUFFIXES)}); put the "
                           f"recordings there, or leave {key} out")
    found = []
    for p in paths:
        try:
            info = sf.info(str(p))
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            raise AugmentError(f"{key}: {p} does not open as audio ({e}); remove or replace it") from None
        if info.frames < 1:
            raise AugmentError(f"{key}: {p} holds no audio; remove it")
        found.append(Recording(str(p), int(info.frames), int(info.samplerate)))
    return tuple(found)


def _read(rec: Recording, start: int, frames: int) -> np.ndarray:
    """``frames`` frames of ``rec`` from ``start`` (its own rate), as mono float32."""
    x, _ = sf.read(rec.path, start=start, frames=frames, dtype="float32", always_2d=True)
    return x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: pocketfft's fast sizes (a power of two can be nearly twice as long)."""
    best, p5 = 1 << (n - 1).bit_length(), 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best, p35 = min(best, m), p35 * 3
        p5 *= 5
    return best


def _convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    size = len(x) + len(h) - 1
    nfft = _fast_length(size)
    return np.fft.irfft(np.fft.rfft(x, nfft) * np.fft.rfft(h, nfft), nfft)[:size]


_RESPONSES: dict[str, np.ndarray] = {}  # impulse responses read in this process (a loader worker), at 16 kHz
RESPONSES_KEPT = 512  # at most this many in memory per worker (4 s of float32 each: 128 MB), the oldest dropped


def _response(rec: "Recording") -> np.ndarray:
    h = _RESPONSES.pop(rec.path, None)
    if h is None:
        h = _read(rec, 0, min(rec.frames, int(RIR_MAX_SECONDS * rec.sample_rate)))
        if rec.sample_rate != SAMPLE_RATE:
            h = _resample(h, rec.sample_rate, SAMPLE_RATE, max(1, round(len(h) * SAMPLE_RATE / rec.sample_rate)))
        while len(_RESPONSES) >= RESPONSES_KEPT:
            _RESPONSES.pop(next(iter(_RESPONSES)))
    _RESPONSES[rec.path] = h  # the most recently used last
    return h.astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The training set's augmentation (the ``augment`` section), picklable for the loader workers."""

    seed: int = 0
    speed_prob: float = 0.0
    speed_factors: tuple[float, ...] = (0.9, 1.1)
    noise: tuple[Recording, ...] = ()
    noise_prob: float = 0.0
    noise_snr_db: tuple[float, float] = (5.0, 20.0)
    rir: tuple[Recording, ...] = ()
    rir_prob: float = 0.0
    lowpass_prob: float = 0.0
    lowpass_hz: tuple[float, float] = (2000.0, 6000.0)
    telephone_prob: float = 0.0
    telephone_codec: str = "ulaw"
    gain_prob: float = 0.0
    gain_db: tuple[float, float] = (-10.0, 6.0)

    @classmethod
    def from_config(cls, args, seed: int) -> "Augmentation | None":
        """The ``augment`` config section (asr_dist.config.AugmentArgs) with its directories scanned, or None when
        it changes nothing."""
        noise = scan_recordings(args.noise_dir, "augment.noise_dir") if args.noise_dir and args.noise_prob else ()
        rir = scan_recordings(args.rir_dir, "augment.rir_dir") if args.rir_dir and args.rir_prob else ()
        aug = cls(seed=seed, speed_prob=args.speed_prob, speed_factors=tuple(float(f) for f in args.speed_factors),
                  noise=noise, noise_prob=args.noise_prob, noise_snr_db=tuple(args.noise_snr_db), rir=rir,
                  rir_prob=args.rir_prob, lowpass_prob=args.lowpass_prob, lowpass_hz=tuple(args.lowpass_hz),
                  telephone_prob=args.telephone_prob, telephone_codec=args.telephone_codec,
                  gain_prob=args.gain_prob, gain_db=tuple(args.gain_db))
        return aug if aug.active else None

    @property
    def active(self) -> bool:
        return any(p > 0 for p in (self.speed_prob, self.noise_prob, self.rir_prob, self.lowpass_prob,
                                   self.telephone_prob, self.gain_prob))

    @property
    def changes_lengths(self) -> bool:
        return self.speed_prob > 0 and any(f != 1.0 for f in self.speed_factors)

    @property
    def longest_stretch(self) -> float:
        """How many times longer an utterance can become (slowed down by the smallest factor)."""
        return max(1.0, 1.0 / min(self.speed_factors)) if self.changes_lengths else 1.0

    def describe(self) -> str:
        parts = []
        if self.speed_prob:
            parts.append(f"speed x{'/'.join(f'{f:g}' for f in self.speed_factors)} p={self.speed_prob:g}")
        if self.rir_prob:
            parts.append(f"reverberation ({len(self.rir)} impulse responses) p={self.rir_prob:g}")
        if self.noise_prob:
            parts.append(f"noise ({len(self.noise)} recordings, {self.noise_snr_db[0]:g}-{self.noise_snr_db[1]:g} dB "
                         f"SNR) p={self.noise_prob:g}")
        if self.lowpass_prob:
            parts.append(f"low-pass {self.lowpass_hz[0]:g}-{self.lowpass_hz[1]:g} Hz p={self.lowpass_prob:g}")
        if self.telephone_prob:
            parts.append(f"telephone ({self.telephone_codec}) p={self.telephone_prob:g}")
        if self.gain_prob:
            parts.append(f"gain {self.gain_db[0]:g} to {self.gain_db[1]:g} dB p={self.gain_prob:g}")
        return ", ".join(parts) or "none"

    def fingerprint(self) -> list:
        """What decides the utterances' lengths (a resume with another one continues in a new order)."""
        return [self.seed, self.speed_prob, list(self.speed_factors)] if self.changes_lengths else []

    # ── the speed factor, known before the audio is read ──

    def speed(self, key: str, epoch: int) -> float:
        if not self.changes_lengths:
            return 1.0
        u, v = _uniforms(self.seed, epoch, key, "speed")
        return self.speed_factors[int(v * len(self.speed_factors))] if u < self.speed_prob else 1.0

    def length(self, key: str, num_samples: int, epoch: int) -> int:
        """The samples utterance ``key`` of ``num_samples`` will have in ``epoch``."""
        return stretched(num_samples, self.speed(key, epoch))

    def lengths(self, keys, num_samples: np.ndarray, epoch: int) -> np.ndarray:
        if not self.changes_lengths:
            return np.asarray(num_samples)
        return np.array([self.length(k, int(n), epoch) for k, n in zip(keys, num_samples)], dtype=np.int64)

    # ── the audio ──

    def __call__(self, audio: np.ndarray, key: str, epoch: int) -> tuple[np.ndarray, dict]:
        """``audio`` (16 kHz mono float32) as utterance ``key`` sounds in ``epoch``, and what was applied."""
        applied: dict = {}
        x = np.array(audio, dtype=np.float32)  # a copy: the caller's array is never changed
        factor = self.speed(key, epoch)
        if factor != 1.0:
            x = _resample(x, SAMPLE_RATE * factor, SAMPLE_RATE, stretched(len(audio), factor))
            applied["speed"] = factor
        rng = _generator(self.seed, epoch, key)
        draws = rng.random(5)  # one per kind, drawn in a fixed order whatever applies
        if self.rir and draws[0] < self.rir_prob:
            rec = self.rir[int(rng.integers(len(self.rir)))]
            x = self._reverberate(x, rec)
            applied["rir"] = os.path.basename(rec.path)
        if self.noise and draws[1] < self.noise_prob:
            rec = self.noise[int(rng.integers(len(self.noise)))]
            snr = float(rng.uniform(*self.noise_snr_db))
            offset = float(rng.random())
            if self._add_noise(x, rec, snr, offset):
                applied.update(noise=os.path.basename(rec.path), snr_db=round(snr, 3))
        if draws[2] < self.telephone_prob:
            x = self._telephone(x)
            applied["telephone"] = self.telephone_codec
        elif draws[3] < self.lowpass_prob:
            cutoff = float(rng.uniform(*self.lowpass_hz))
            x = _resample(_resample(x, SAMPLE_RATE, 2 * cutoff, int(len(x) * 2 * cutoff / SAMPLE_RATE) + 1),
                          2 * cutoff, SAMPLE_RATE, len(x))
            applied["lowpass_hz"] = round(cutoff)
        if draws[4] < self.gain_prob:
            gain = float(rng.uniform(*self.gain_db))
            x = np.clip(x * np.float32(10.0 ** (gain / 20.0)), -1.0, 1.0)
            applied["gain_db"] = round(gain, 3)
        return x.astype(np.float32, copy=False), applied

    def _reverberate(self, x: np.ndarray, rec: Recording) -> np.ndarray:
        h = _response(rec)
        peak = int(np.argmax(np.abs(h)))
        if not np.abs(h[peak]) > 0:
            return x  # a silent response changes nothing
        # aligned on the direct path: the words stay where the transcript's frames expect them
        y = _convolve(x.astype(np.float64), h)[peak:peak + len(x)]
        level, out = _rms(x), _rms(y)
        return (y * (level / out) if out > 0 else y).astype(np.float32)

    @staticmethod
    def _add_noise(x: np.ndarray, rec: Recording, snr_db: float, offset: float) -> bool:
        """Add a stretch of ``rec`` to ``x`` in place at ``snr_db``, from ``offset`` (0-1) of it; False when
        either is silent."""
        n = len(x)
        need = int(np.ceil(n * rec.sample_rate / SAMPLE_RATE)) + 1
        if rec.frames > need:
            noise = _read(rec, int(offset * (rec.frames - need)), need)
        else:  # a short recording loops
            noise = np.tile(_read(rec, 0, rec.frames), need // rec.frames + 1)[:need]
        noise = (_resample(noise, rec.sample_rate, SAMPLE_RATE, n) if rec.sample_rate != SAMPLE_RATE
                 else _fit(noise, n))
        signal_rms, noise_rms = _rms(x), _rms(noise)
        if not (signal_rms > 0 and noise_rms > 0):
            return False
        x += noise * np.float32(signal_rms / (noise_rms * 10.0 ** (snr_db / 20.0)))
        return True

    def _telephone(self, x: np.ndarray) -> np.ndarray:
        """A telephone line: 8 kHz, 300-3400 Hz, through the codec (G.711 mu-law or A-law, or GSM 6.10)."""
        narrow = _resample(x, SAMPLE_RATE, 8000, max(1, round(len(x) / 2)))
        nfft = _fast_length(len(narrow))  # a length with a prime factor makes the FFT many times slower
        spectrum = np.fft.rfft(narrow, nfft)
        freqs = np.fft.rfftfreq(nfft, 1 / 8000)
        spectrum[(freqs < 300) | (freqs > 3400)] = 0
        narrow = np.fft.irfft(spectrum, nfft)[:len(narrow)].astype(np.float32)
        codec = CODECS[self.telephone_codec]
        if codec is not None:
            buf = io.BytesIO()
            sf.write(buf, np.clip(narrow, -1.0, 1.0), 8000, format=codec[0], subtype=codec[1])
            narrow, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")
        return _resample(narrow, 8000, SAMPLE_RATE, len(x))


@dataclasses.dataclass(frozen=True)
class EpochAugment:
    """The augmentation of one epoch, as a stream's BatchMaker applies it."""

    augmentation: Augmentation
    epoch: int

    def length(self, key: str, num_samples: int) -> int:
        return self.augmentation.length(key, num_samples, self.epoch)

    def __call__(self, audio: np.ndarray, key: str) -> np.ndarray:
        return self.augmentation(audio, key, self.epoch)[0]


def write_preview(shard_dirs: list[str], augmentation: Augmentation, out: str, count: int = 8, epoch: int = 0,
                  every_kind: bool = False) -> list[dict]:
    """The first ``count`` training utterances as WAV, each beside its augmented self as epoch ``epoch`` would
    deliver it (KEY.original.wav, KEY.augmented.wav), and applied.tsv saying what was applied to each.
    ``every_kind``: every configured kind on every utterance (its probability taken as 1), to hear each."""
    from . import index as fmt
    from . import remote
    from .samples import decode_audio, sample_meta
    from .shardset import ShardSet

    if every_kind:
        augmentation = dataclasses.replace(augmentation, **{
            f"{kind}_prob": 1.0 for kind in ("speed", "noise", "rir", "lowpass", "telephone", "gain")
            if getattr(augmentation, f"{kind}_prob") > 0})
    shards = ShardSet.open(shard_dirs)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in shards.shards:
        if len(rows) >= count:
            break
        with remote.open_stream(shard) as f:
            samples = list(itertools.islice(fmt.iter_shard(shard.path, fileobj=f), count - len(rows)))
        for key, files in samples:
            audio = decode_audio(files[shards.audio_format], f"{shard.path} sample {key}")
            text = sample_meta(files["json"])["text"]
            changed, applied = augmentation(audio, key, epoch)
            name = key.replace("/", "_")
            sf.write(target / f"{name}.original.wav", audio, SAMPLE_RATE, subtype="PCM_16")
            sf.write(target / f"{name}.augmented.wav", np.clip(changed, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
            rows.append({"key": key, "text": text, "seconds": round(len(audio) / SAMPLE_RATE, 3),
                         "augmented_seconds": round(len(changed) / SAMPLE_RATE, 3), "applied": applied})
    import json

    lines = ["key\tseconds\taugmented_seconds\tapplied\ttext"]
    lines += [f"{r['key']}\t{r['seconds']}\t{r['augmented_seconds']}\t{json.dumps(r['applied'])}\t{r['text']}"
              for r in rows]
    (target / "applied.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows
