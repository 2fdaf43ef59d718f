"""Decoding, checking, resampling and encoding on real files of every common kind."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from asr_dist.audio import AudioError, decode, encode, probe, to_16k


def tone(sr: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def file_bytes(x: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_24"), ("OGG", "VORBIS"), ("MP3", None)])
@pytest.mark.parametrize("sr, channels", [(44100, 2), (8000, 1)])
def test_any_format_to_16k_mono(tmp_path, fmt, subtype, sr, channels):
    data = file_bytes(tone(sr, 1.5, channels), sr, fmt, subtype)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for source in (data, str(path)):
        frames, rate = probe(source)
        audio, rate2 = decode(source)
        assert rate == rate2 == sr and audio.ndim == 1
        assert abs(len(audio) - frames) <= 0.02 * frames
        y = to_16k(audio, sr)
        assert abs(len(y) / 16000 - 1.5) < 0.08  # MP3 pads a little
    back, rate = decode(encode(y, "flac"))
    assert rate == 16000 and len(back) == len(y) and np.max(np.abs(back - np.clip(y, -1, 1))) < 1e-3


def test_damage_is_named(tmp_path):
    good = file_bytes(tone(22050, 1.0), 22050, "WAV", "PCM_16")
    with pytest.raises(AudioError) as e:
        decode(good[: len(good) // 2])
    assert e.value.reason == "truncated_audio"
    flac = file_bytes(tone(22050, 1.0), 22050, "FLAC")
    for fn in (decode, probe):
        with pytest.raises(AudioError) as e:
            fn(flac[: len(flac) // 2])
        assert e.value.reason in ("truncated_audio", "corrupt_audio")
    for fn in (decode, probe):
        with pytest.raises(AudioError) as e:
            fn(b"")
        assert e.value.reason == "empty_audio"
        with pytest.raises(AudioError) as e:
            fn(b"RIFF not really a wave file at all" * 10)
        assert e.value.reason == "corrupt_audio"
        with pytest.raises(AudioError) as e:
            fn(str(tmp_path / "missing.wav"))
        assert e.value.reason == "missing_file"
    nan = file_bytes(np.full(1000, np.nan, np.float32), 16000, "WAV", "FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        decode(nan)


def test_segments():
    data = file_bytes(tone(16000, 2.0), 16000, "WAV", "PCM_16")
    audio, _ = decode(data, offset=0.5, duration=1.0)
    assert len(audio) == 16000
    assert probe(data, offset=1.5) == (8000, 16000)
    with pytest.raises(AudioError, match="bad_segment"):
        decode(data, offset=1.5, duration=1.0)
    with pytest.raises(AudioError, match="bad_segment"):
        probe(data, offset=3.0)
