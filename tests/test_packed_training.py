"""data.pack through DeepSpeed: two gloo ranks train on packed micro-batches as on padded ones, and resume exactly,
with the training audio augmented (speed perturbation changes the lengths the packing plans with)."""

from __future__ import annotations

import json

import pytest

from trainkit import launch, losses, overrides

RUN = ("train.max_steps=6", "train.checkpoint_every=3", "eval.every_steps=0", "model.mask_time_prob=0.1",
       "model.mask_time_length=3", "distributed.zero_stage=1")


@pytest.mark.slow  # three launches of two ranks
def test_two_ranks_train_packed_as_padded_and_resume_exactly(train_shards, tmp_path):
    """The same 6 steps (SpecAugment and augmentation on) padded and packed: the same loss at every step within
    float tolerance (packing changes the order of sums, not what is summed), and the same evaluation counts. A
    packed run cut after step 3 resumes to the same losses as the run that went through."""
    import numpy as np
    import soundfile as sf

    (tmp_path / "noise").mkdir()
    sf.write(tmp_path / "noise" / "n.wav", 0.1 * np.random.default_rng(0).standard_normal(32000), 16000)
    augment = ("augment.speed_prob=0.5", "augment.noise_prob=0.5", f"augment.noise_dir={tmp_path / 'noise'}")
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    r = launch("torchrun", overrides(train_shards, padded, *RUN, *augment))
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch("torchrun", overrides(train_shards, packed, *RUN, *augment, "data.pack=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "packed micro-batches: utterances start on multiples of 320 samples; attention sdpa" in r.stderr
    assert "augmentation of the training audio (drawn per utterance and epoch): speed x0.9/1.1 p=0.5, noise" in r.stderr
    a, b = losses(padded), losses(packed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) <= 1e-4 * abs(a[s]) for s in a), (a, b)
    evals = [json.loads((d / "eval_results.json").read_text())["eval"]["dev"] for d in (padded, packed)]
    assert evals[0]["utterances"] == evals[1]["utterances"] == 10 and evals[0]["words"] == evals[1]["words"]
    assert evals[1]["loss"] == pytest.approx(evals[0]["loss"], rel=1e-3)  # the two models are the same model
    assert abs(evals[0]["cer"] - evals[1]["cer"]) <= 0.01, evals
    # cut after step 3: the save of step 6 never completed
    (packed / "checkpoints" / "step-00000006" / "COMPLETE").unlink()
    r = launch("torchrun", overrides(train_shards, packed, *RUN, *augment, "data.pack=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 3" in r.stderr
    resumed = losses(packed)
    assert [resumed[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
