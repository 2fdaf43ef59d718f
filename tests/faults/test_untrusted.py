"""Untrusted input: a checkpoint that would run code when unpickled is refused, naming the file;
the data path's tar reader refuses unsafe members (tests/data/test_verify.py covers those)."""

from __future__ import annotations

import pytest
import torch

from trainkit import launch, overrides

pytestmark = pytest.mark.slow


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # a file appears if this is ever unpickled


def test_checkpoint_with_code_in_it_is_refused(train_shards, tmp_path):
    out = tmp_path / "run"
    args = overrides(train_shards, out, "train.max_steps=2", "train.checkpoint_every=0", "eval.every_steps=0",
                     "data.eval_shards={}", "train.max_steps=4")
    r = launch("python", args[:-1])
    assert r.returncode == 0, r.stderr[-3000:]
    states = out / "checkpoints" / "step-00000002" / "mp_rank_00_model_states.pt"
    good = torch.load(states, weights_only=True)
    pwned = tmp_path / "PWNED"
    torch.save({**good, "module": Payload(str(pwned))}, states)
    r = launch("python", args)
    assert r.returncode != 0
    assert "refused for safety" in r.stderr and "step-00000002" in r.stderr, r.stderr[-3000:]
    assert not pwned.exists()


def test_zero3_checkpoint_with_code_in_it_is_refused_by_evaluate(train_shards, tmp_path):
    """evaluate/transcribe/export of a ZeRO-3 checkpoint gathers its partitions with DeepSpeed's
    zero_to_fp32, which loads with weights_only=False: asr-dist makes those loads weights-only too."""
    from asr_dist.decode import evaluate_model

    out = tmp_path / "run"
    r = launch("python", overrides(train_shards, out, "train.max_steps=2", "train.checkpoint_every=0",
                                   "eval.every_steps=0", "data.eval_shards={}", "distributed.zero_stage=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-00000002"
    dev = str(train_shards / "s-dev")
    assert evaluate_model(str(ckpt), dev, num_workers=0, progress=False)["num_utterances"] > 0  # the intact one loads
    optim = next(ckpt.glob("*optim_states.pt"))
    good = torch.load(optim, weights_only=False)
    pwned = tmp_path / "PWNED"
    torch.save({**good, "optimizer_state_dict": Payload(str(pwned))}, optim)
    with pytest.raises(ValueError, match="refused for safety") as e:
        evaluate_model(str(ckpt), dev, num_workers=0, progress=False)
    assert "step-00000002" in str(e.value)
    assert not pwned.exists()
