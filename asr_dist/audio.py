"""Audio decoding, resampling and encoding.

file | bytes ──soundfile──> float32 (T_in, C) at sr_in ──mean over C──> (T_in,)
      ──soxr HQ──> (T,) at 16 kHz ──> FLAC | 16-bit WAV bytes

Everything decodes from memory or a path with libsndfile (wav, flac, ogg, mp3, …); no temporary
files, no FFmpeg.
"""

from __future__ import annotations

import io
import re
import subprocess

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
# libsndfile's log for a WAV whose data chunk is shorter than its header says, e.g. "data : 44100 (should be 22028)"
_SHORT_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
_STREAMING_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)  # placeholders written by streaming WAV writers
AUDIO_FORMATS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}


class AudioError(Exception):
    """Audio that cannot be used; ``reason`` is a short code for rejects.tsv."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_source_bytes(path: str) -> bytes:
    """Bytes of a file, or the stdout of a Kaldi wav.scp command ending in '|'."""
    if path.rstrip().endswith("|"):
        proc = subprocess.run(path.rstrip()[:-1], shell=True, capture_output=True, check=False)
        if proc.returncode != 0:
            raise AudioError("command_failed", f"exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
        return proc.stdout
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise AudioError("missing_file", f"no such file: {path}") from None
    except IsADirectoryError:
        raise AudioError("missing_file", f"is a directory, not audio: {path}") from None
    except OSError as e:
        raise AudioError("unreadable_file", f"{path}: {e.strerror}") from None


def decode(data: bytes, offset: float = 0.0, duration: float | None = None) -> tuple[np.ndarray, int]:
    """Decode audio bytes to float32 mono; ``offset``/``duration`` in seconds cut a segment."""
    if len(data) == 0:
        raise AudioError("empty_audio", "file has zero bytes")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = f.samplerate
            short = _SHORT_CHUNK.search(f.extra_info)
            if short and int(short.group(1)) not in _STREAMING_SIZES and int(short.group(1)) > int(short.group(2)):
                raise AudioError(
                    "truncated_audio", f"the file ends early: {short.group(2)} of {short.group(1)} audio bytes present"
                )
            start = int(round(offset * sr))
            if start:
                if start >= f.frames:
                    raise AudioError("bad_segment", f"offset {offset}s is past the end ({f.frames / sr:.2f}s)")
                f.seek(start)
            frames = -1 if duration is None else int(round(duration * sr))
            audio = f.read(frames, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
        raise AudioError("corrupt_audio", str(e).strip() or type(e).__name__) from None
    # segment ends are often rounded (Kaldi: 10 ms); a shortfall beyond 20 ms means a wrong segment
    if duration is not None and audio.shape[0] < int(round((duration - 0.02) * sr)):
        raise AudioError(
            "bad_segment", f"segment of {duration}s at {offset}s ends past the audio ({audio.shape[0] / sr:.2f}s read)"
        )
    if audio.shape[0] == 0:
        raise AudioError("empty_audio", "no samples")
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError("corrupt_audio", "samples are NaN or infinite")
    return np.ascontiguousarray(mono, dtype=np.float32), sr


def to_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    """Resample (T_in,) float32 at ``sr`` to 16 kHz with soxr's high-quality filter."""
    if sr == SAMPLE_RATE:
        return audio
    return soxr.resample(audio, sr, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def encode(audio: np.ndarray, fmt: str = "flac") -> bytes:
    """16 kHz float32 (T,) to 16-bit FLAC or WAV bytes; samples beyond ±1 are clipped."""
    container, subtype = AUDIO_FORMATS[fmt]
    buf = io.BytesIO()
    pcm = np.clip(audio, -1.0, 32767 / 32768)
    sf.write(buf, pcm, SAMPLE_RATE, format=container, subtype=subtype)
    return buf.getvalue()


def decode_16k(data: bytes) -> np.ndarray:
    """Decode a stored 16 kHz sample (as written by ``encode``) to float32 (T,)."""
    audio, sr = decode(data)
    if sr != SAMPLE_RATE:
        raise AudioError("wrong_sample_rate", f"{sr} Hz, expected {SAMPLE_RATE}")
    return audio


# wav2vec2's convolutional feature encoder: (kernel, stride) per layer; about 49.9 frames per second
WAV2VEC2_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


def num_ctc_frames(num_samples: int, conv=WAV2VEC2_CONV) -> int:
    """Output frames of wav2vec2's feature encoder for ``num_samples`` 16 kHz samples."""
    n = num_samples
    for kernel, stride in conv:
        n = (n - kernel) // stride + 1
        if n <= 0:
            return 0
    return n
