"""Augmentation of the training audio: each kind changes the audio as specified, every draw comes from
(seed, epoch, key), the loader plans with the perturbed lengths, resume stays exact, and bad settings are
refused naming what to change."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf

from asr_dist.config import ConfigError, merge_config, validate
from asr_dist.data.augment import Augmentation, AugmentError, scan_recordings, stretched
from asr_dist.data.loader import TrainLoader
from trainkit import make_noise_shards


def tone(seconds: float = 2.0, hz: float = 440.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A noise directory (white noise at 16 and 8 kHz, one shorter than the utterances) and a room impulse
    response directory (a delayed peak with an exponential tail, at 16 kHz)."""
    root = tmp_path_factory.mktemp("recordings")
    rng = np.random.default_rng(3)
    (root / "noise" / "sub").mkdir(parents=True)
    sf.write(root / "noise" / "white.wav", 0.1 * rng.standard_normal(16000 * 5).astype(np.float32), 16000)
    sf.write(root / "noise" / "sub" / "short-8k.flac", 0.05 * rng.standard_normal(4000).astype(np.float32), 8000)
    (root / "rir").mkdir()
    h = np.zeros(8000, dtype=np.float32)
    h[400] = 1.0
    h[401:] = 0.1 * rng.standard_normal(7599) * np.exp(-np.arange(7599) / 1200)
    sf.write(root / "rir" / "room.wav", h, 16000, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def noise_set(tmp_path_factory):
    return str(make_noise_shards(tmp_path_factory.mktemp("shards"), n=64) / "s-train")


def test_speed_perturbation_scales_the_length_by_the_factor_and_keeps_the_pitch_ratio():
    aug = Augmentation(speed_prob=1.0, speed_factors=(0.9, 1.1))
    x = tone(2.0, 500.0)
    seen = set()
    for key in (f"utt{i}" for i in range(40)):
        y, applied = aug(x, key, epoch=0)
        factor = applied["speed"]
        seen.add(factor)
        assert len(y) == stretched(len(x), factor) == round(len(x) / factor) == aug.length(key, len(x), 0)
        peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * 16000 / len(y)
        assert peak_hz == pytest.approx(500.0 * factor, rel=0.01)  # resampled: the pitch moves with the speed
    assert seen == {0.9, 1.1}


def test_noise_is_added_at_the_drawn_snr(recordings):
    noise = scan_recordings(str(recordings / "noise"), "augment.noise_dir")
    assert [r.sample_rate for r in noise] == [8000, 16000]  # found recursively, rates read from the headers
    aug = Augmentation(noise=noise, noise_prob=1.0, noise_snr_db=(0.0, 20.0))
    x = tone(3.0)
    for key in ("a", "b", "c", "d", "e", "f"):
        y, applied = aug(x, key, epoch=1)
        assert len(y) == len(x)
        added = y - x
        assert 10 * np.log10(rms(x) ** 2 / rms(added) ** 2) == pytest.approx(applied["snr_db"], abs=0.05)
        assert 0.0 <= applied["snr_db"] <= 20.0 and applied["noise"] in ("white.wav", "short-8k.flac")


def test_gain_changes_the_level_by_the_drawn_decibels_and_clips():
    aug = Augmentation(gain_prob=1.0, gain_db=(-12.0, 3.0))
    x = tone(1.0, level=0.1)
    for key in ("k1", "k2", "k3"):
        y, applied = aug(x, key, epoch=0)
        assert 20 * np.log10(rms(y) / rms(x)) == pytest.approx(applied["gain_db"], abs=1e-3)
    loud = Augmentation(gain_prob=1.0, gain_db=(20.0, 20.0))(tone(1.0, level=0.5), "k", 0)[0]
    assert np.abs(loud).max() == pytest.approx(1.0)  # clipped, as a hot microphone is


def test_reverberation_keeps_the_words_in_place_and_the_level(recordings):
    rir = scan_recordings(str(recordings / "rir"), "augment.rir_dir")
    x = np.zeros(16000, dtype=np.float32)
    x[8000] = 0.5  # a click: what comes out is the room's response
    y, applied = Augmentation(rir=rir, rir_prob=1.0)(x, "k", 0)
    assert applied == {"rir": "room.wav"} and len(y) == len(x)
    assert np.argmax(np.abs(y)) == 8000  # aligned on the direct path: no delay
    assert np.abs(y[8200:]).max() > 0.01  # and a tail
    assert rms(y) == pytest.approx(rms(x), rel=1e-4)


def test_band_limits_remove_what_is_above_the_cutoff():
    x = tone(1.0, 300.0) + tone(1.0, 6500.0)
    low, applied = Augmentation(lowpass_prob=1.0, lowpass_hz=(3000.0, 3000.0))(x, "k", 0)
    spectrum = np.abs(np.fft.rfft(low))
    assert applied == {"lowpass_hz": 3000} and len(low) == len(x)
    assert spectrum[6500] < 0.01 * spectrum[300]
    for codec in ("ulaw", "alaw", "gsm", "none"):
        phone, applied = Augmentation(telephone_prob=1.0, telephone_codec=codec)(x, "k", 0)
        spectrum = np.abs(np.fft.rfft(phone))
        assert applied == {"telephone": codec} and len(phone) == len(x)
        assert spectrum[6500] < 0.01 * spectrum[300] and spectrum[300] > 0.3 * np.abs(np.fft.rfft(x))[300]
    assert not np.allclose(Augmentation(telephone_prob=1.0, telephone_codec="ulaw")(x, "k", 0)[0],
                           Augmentation(telephone_prob=1.0, telephone_codec="none")(x, "k", 0)[0], atol=1e-3)


def test_every_draw_depends_on_seed_epoch_and_key_alone(recordings):
    noise = scan_recordings(str(recordings / "noise"), "augment.noise_dir")
    aug = Augmentation(seed=4, speed_prob=0.5, noise=noise, noise_prob=0.5, gain_prob=0.5, lowpass_prob=0.5)
    x = tone(1.5)
    first = {k: aug(x, k, 2) for k in map(str, range(30))}
    again = {k: aug(x, k, 2) for k in reversed(list(map(str, range(30))))}
    for k in first:
        assert first[k][1] == again[k][1] and np.array_equal(first[k][0], again[k][0])
    applied = [a for _, a in first.values()]
    assert 5 < sum("speed" in a for a in applied) < 25 and 5 < sum("noise" in a for a in applied) < 25
    assert [aug(x, k, 3)[1] for k in first] != applied  # another epoch, other draws
    assert [dataclasses.replace(aug, seed=5)(x, k, 2)[1] for k in first] != applied


@pytest.mark.parametrize("plan", [True, False])
def test_the_loader_plans_with_the_lengths_it_delivers(noise_set, plan):
    aug = Augmentation(seed=0, speed_prob=0.7, speed_factors=(0.9, 1.1))
    loader = TrainLoader(noise_set, rank=1, world_size=2, micro_batch_size=4, global_batch_size=16, num_workers=0,
                         bucket_batches=2, length_plan=plan, augment=aug)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        planned = list(loader.plan())
        delivered = list(loader)
        assert [p["keys"] for p in planned] == [b["keys"] for b in delivered]
        assert [p["num_samples"] for p in planned] == [b["attention_mask"].sum(1).tolist() for b in delivered]
        stretched_any = [n for p in planned for n in p["num_samples"]]
        assert len(stretched_any) == loader.micro_batches_per_epoch * 4
    plain = TrainLoader(noise_set, rank=1, world_size=2, micro_batch_size=4, global_batch_size=16, num_workers=0,
                        bucket_batches=2, length_plan=plan)
    plain.set_epoch(1)
    by_key = {k: n for p in plain.plan() for k, n in zip(p["keys"], p["num_samples"])}
    factors = {round(by_key[k] / n, 2) for p in planned for k, n in zip(p["keys"], p["num_samples"]) if k in by_key}
    assert factors == {0.9, 1.0, 1.1}


@pytest.mark.parametrize("workers, plan", [(0, True), pytest.param(2, False, marks=pytest.mark.slow)])
def test_resume_with_augmentation_continues_the_identical_audio(noise_set, recordings, workers, plan):
    noise = scan_recordings(str(recordings / "noise"), "augment.noise_dir")
    aug = Augmentation(seed=1, speed_prob=0.5, noise=noise, noise_prob=0.5, gain_prob=0.3)
    kw = dict(rank=0, world_size=1, micro_batch_size=4, global_batch_size=8, num_workers=workers, bucket_batches=2,
              length_plan=plan, augment=aug)
    whole = TrainLoader(noise_set, **kw)
    whole.set_epoch(1)
    expected = [b["input_values"] for b in whole]
    first = TrainLoader(noise_set, **kw)
    first.set_epoch(1)
    got = []
    for i, b in enumerate(first):
        got.append(b["input_values"])
        if i == 4:
            break
    second = TrainLoader(noise_set, **kw)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [b["input_values"] for b in second]
    assert len(got) == len(expected) and all(a.equal(b) for a, b in zip(got, expected))
    plain = TrainLoader(noise_set, **{**kw, "augment": None})
    plain.set_epoch(1)
    assert not all(a.shape == b.shape and a.equal(b) for a, b in zip(expected, (b["input_values"] for b in plain)))


def test_packing_capacities_hold_the_slowest_speed(noise_set):
    kw = dict(rank=0, world_size=1, micro_batch_size=4, global_batch_size=8, num_workers=0, length_plan=True,
              pack_align=320)
    slow = TrainLoader(noise_set, augment=Augmentation(speed_prob=1.0, speed_factors=(0.8,)), **kw)
    assert max(slow.capacities) > max(TrainLoader(noise_set, **kw).capacities)
    for epoch in (0, 1):
        slow.set_epoch(epoch)
        planned = list(slow.plan())
        for p, b in zip(planned, slow):
            assert b["input_values"].shape[1] in slow.capacities
            assert b["lengths"].tolist() == p["num_samples"]


def test_settings_that_cannot_work_are_refused_naming_them(tmp_path, recordings):
    def config(*extra):
        cfg = merge_config(None, ["output_dir=x", "data.train_shards=[x]", "model.preset=tiny", "train.max_steps=1",
                                  *extra])
        validate(cfg)
        return cfg

    for bad, words in ((["augment.speed_prob=1.5"], "augment.speed_prob=1.5"),
                       (["augment.noise_snr_db=[20, 5]"], "augment.noise_snr_db"),
                       (["augment.speed_factors=[3]"], "augment.speed_factors"),
                       (["augment.telephone_codec=opus"], "choose one of ulaw"),
                       (["augment.noise_prob=0.5"], "needs augment.noise_dir")):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
            config(*bad)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.wav").write_bytes(b"RIFF not audio")
    cases = ((tmp_path / "missing", "no such directory"), (tmp_path / "empty", "no audio files in it"),
             (tmp_path / "broken", "x.wav does not open as audio"))
    for directory, words in cases:
        cfg = config("augment.noise_prob=0.5", f"augment.noise_dir={directory}")
        with pytest.raises(AugmentError, match=words) as e:
            Augmentation.from_config(cfg.augment, cfg.seed)
        assert "augment.noise_dir" in str(e.value)
    cfg = config("augment.rir_prob=0.2", f"augment.rir_dir={recordings / 'rir'}")
    assert "reverberation (1 impulse responses)" in Augmentation.from_config(cfg.augment, 0).describe()
    assert Augmentation.from_config(config().augment, 0) is None  # nothing on by default


def test_augment_preview_writes_each_utterance_beside_its_augmented_self(noise_set, recordings, tmp_path, capsys):
    from asr_dist.cli import main

    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{train_shards: [{noise_set}]}}\nmodel: {{preset: tiny}}\n"
                    f"train: {{max_steps: 1}}\naugment: {{speed_prob: 0.2, noise_prob: 0.1, noise_dir: "
                    f"{recordings / 'noise'}}}\n")
    out = tmp_path / "preview"
    assert main(["augment-preview", "-c", str(yaml), "--out", str(out), "-n", "3", "--every-kind"]) == 0
    rows = (out / "applied.tsv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("key\tseconds\taugmented_seconds\tapplied")
    for row in rows[1:]:
        key, seconds, stretched_s, applied, _ = row.split("\t")
        applied = json.loads(applied)
        assert set(applied) == {"speed", "noise", "snr_db"}  # --every-kind: each configured kind on each
        original, augmented = sf.read(out / f"{key}.original.wav"), sf.read(out / f"{key}.augmented.wav")
        assert len(augmented[0]) == round(len(original[0]) / applied["speed"])
        assert float(stretched_s) == pytest.approx(float(seconds) / applied["speed"], abs=1e-3)
    assert "3 utterances in" in capsys.readouterr().out
    assert main(["augment-preview", "-c", str(yaml), "--out", str(out), "augment.speed_prob=0",
                 "augment.noise_prob=0"]) == 2
    assert "changes nothing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["augment-preview", "-c", str(yaml), "--out", str(out), f"augment.noise_dir={tmp_path / 'empty'}"]) == 2
    assert f"augment.noise_dir={tmp_path / 'empty'}: no audio files" in capsys.readouterr().err
