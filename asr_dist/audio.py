"""Audio decoding, resampling, encoding and normalisation.

file | bytes ──soundfile──> float32 (T_in, C) at sr_in ──mean over C──> (T_in,)
      ──soxr HQ──> (T,) at 16 kHz ──> FLAC | 16-bit WAV bytes
16 kHz (T,) ──normalize: zero mean, unit variance──> (T,), the waveform families' model input

Everything decodes from memory or a path with libsndfile (wav, flac, ogg, mp3, …); no temporary
files, no FFmpeg.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import subprocess

import numpy as np
import soundfile as sf
import soxr

from .errors import UserError

SAMPLE_RATE = 16000
# libsndfile's log for a WAV whose data chunk is shorter than its header says, e.g. "data : 44100 (should be 22028)"
_SHORT_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
_STREAMING_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)  # placeholders written by streaming WAV writers
AUDIO_FORMATS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}


class AudioError(UserError):
    """Audio that cannot be used; ``reason`` is a short code for rejects.tsv."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_file_bytes(path: str) -> bytes:
    """The bytes of an audio file (a name is a name: nothing in it is run)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _path_error(path, e) from None


def run_command(command: str) -> bytes:
    """The stdout of a Kaldi wav.scp command (``sox in.sph -t wav - |`` without its '|'), run by the
    shell. Only for manifests whose commands the user allowed (--allow-commands)."""
    proc = subprocess.run(command, shell=True, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AudioError("command_failed", f"exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
    return proc.stdout


def check_audio_path(path: str) -> str:
    """The path of an existing, non-empty file, or an AudioError saying what is wrong with it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _path_error(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise AudioError("missing_file", f"not a regular file: {path}")
    if st.st_size == 0:
        raise AudioError("empty_audio", "file has zero bytes")
    return path


def _path_error(path: str, e: OSError) -> AudioError:
    if isinstance(e, FileNotFoundError):
        return AudioError("missing_file", f"no such file: {path}")
    if isinstance(e, IsADirectoryError):
        return AudioError("missing_file", f"is a directory, not audio: {path}")
    return AudioError("unreadable_file", f"{path}: {e.strerror}")


# Subtypes where every byte pattern is valid audio: reading the samples cannot find damage that the
# header checks miss, so checking them costs a header read only
_PCM_SUBTYPES = {"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"}
_PCM_CONTAINERS = {"WAV", "WAVEX", "AIFF", "RF64", "W64", "AU", "CAF"}


def _open(source) -> sf.SoundFile:
    """A SoundFile over bytes or a path (libsndfile's own I/O), with truncated WAV data refused."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise AudioError("empty_audio", "file has zero bytes")
        source = io.BytesIO(source)
    else:
        check_audio_path(source)
    try:
        f = sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
        raise AudioError("corrupt_audio", str(e).strip() or type(e).__name__) from None
    short = _SHORT_CHUNK.search(f.extra_info)
    if short and int(short.group(1)) not in _STREAMING_SIZES and int(short.group(1)) > int(short.group(2)):
        f.close()
        raise AudioError("truncated_audio", f"the file ends early: {short.group(2)} of {short.group(1)} audio bytes present")
    return f


def _segment(f: sf.SoundFile, offset: float, duration: float | None) -> tuple[int, int]:
    """(first frame, number of frames) of the wanted segment, checked against the file's length."""
    sr = f.samplerate
    start = int(round(offset * sr))
    if start and start >= f.frames:
        raise AudioError("bad_segment", f"offset {offset}s is past the end ({f.frames / sr:.2f}s)")
    available = f.frames - start
    if duration is None:
        return start, available
    want = int(round(duration * sr))
    # segment ends are often rounded (Kaldi: 10 ms); a shortfall beyond 20 ms means a wrong segment
    if available < int(round((duration - 0.02) * sr)):
        raise AudioError("bad_segment", f"segment of {duration}s at {offset}s ends past the audio ({f.frames / sr:.2f}s)")
    return start, min(want, available)


def _check_complete(f: sf.SoundFile, got: int, frames: int) -> None:
    # an MP3 header's length is an estimate (exact only with a Xing/Info frame): allow 2 % there
    slack = int(0.02 * frames) if f.format == "MP3" else 0
    if got < frames - slack:
        raise AudioError("truncated_audio", f"{got} of the {frames} frames the header announces")


@contextlib.contextmanager
def _reading(source):
    """An open SoundFile; libsndfile's errors while reading become ``corrupt_audio``."""
    f = _open(source)
    try:
        yield f
    except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
        raise AudioError("corrupt_audio", str(e).strip() or type(e).__name__) from None
    finally:
        f.close()


# decoded frames per byte of the file that no sound stream of the format can exceed: MP3 holds at most
# about 12 (32 kbit/s at 48 kHz; 8 at MPEG-2.5's lowest), Vorbis/Opus about 64 (6 kbit/s at 48 kHz), FLAC's
# constant frames about 8000 (65535 samples in 8 bytes); beyond that a damaged stream is decoding garbage
# (a mutated 1.5 kB MP3 decoded 17 GB before this bound)
_FRAMES_PER_BYTE = {"MP3": 200, "MPEG": 200, "OGG": 1000, "FLAC": 16384}


def _frame_bound(source, f: sf.SoundFile) -> int | None:
    per_byte = _FRAMES_PER_BYTE.get(f.format)
    if per_byte is None:
        return None
    size = len(source) if isinstance(source, (bytes, bytearray, memoryview)) else os.path.getsize(source)
    return per_byte * max(size, 1024)


def _blocks(source, f: sf.SoundFile, frames: int):
    """The audio in blocks of 65536 frames, stopped with a clear error once a compressed stream has
    decoded more than its file's size can hold."""
    bound, got = _frame_bound(source, f), 0
    for block in f.blocks(blocksize=1 << 16, frames=frames, dtype="float32", always_2d=True):
        got += block.shape[0]
        if bound is not None and got > bound:
            raise AudioError("corrupt_audio", f"the {f.format} stream decodes to more than {bound} frames, more "
                                              f"than its {bound // _FRAMES_PER_BYTE[f.format]} bytes can hold: damaged")
        yield block


def decode(source, offset: float = 0.0, duration: float | None = None) -> tuple[np.ndarray, int]:
    """Decode audio (bytes or a path) to float32 mono; ``offset``/``duration`` in
    seconds cut a segment."""
    with _reading(source) as f:
        start, frames = _segment(f, offset, duration)
        if start:
            f.seek(start)
        # in blocks: the header's frame count is a claim (a damaged one says 2**36), the bytes are the bound
        blocks = list(_blocks(source, f, frames))
        audio = np.concatenate(blocks) if blocks else np.zeros((0, f.channels), np.float32)
        if audio.shape[0] == 0:
            raise AudioError("empty_audio", "no samples")
        _check_complete(f, audio.shape[0], frames)
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError("corrupt_audio", "samples are NaN or infinite")
    return np.ascontiguousarray(mono, dtype=np.float32), f.samplerate


def probe(source, offset: float = 0.0, duration: float | None = None) -> tuple[int, int]:
    """(frames, sample rate) of the audio or segment, checking it as far as decoding would: a
    compressed file is decoded in blocks (and dropped), a PCM file needs only its header."""
    with _reading(source) as f:
        start, frames = _segment(f, offset, duration)
        if frames <= 0:
            raise AudioError("empty_audio", "no samples")
        if f.format in _PCM_CONTAINERS and f.subtype in _PCM_SUBTYPES and f.subtype not in ("FLOAT", "DOUBLE"):
            return frames, f.samplerate
        if start:
            f.seek(start)
        got = 0
        for block in _blocks(source, f, frames):
            if not np.isfinite(block).all():
                raise AudioError("corrupt_audio", "samples are NaN or infinite")
            got += block.shape[0]
        _check_complete(f, got, frames)
        return got, f.samplerate


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


def normalize(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, as Wav2Vec2FeatureExtractor(do_normalize=True)."""
    return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
