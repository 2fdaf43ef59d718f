"""Checkpoint directories without training: which are complete, which is latest, what pruning keeps, and
loads that refuse a pickle that would run code (tests/faults/ cut real saves and load real checkpoints)."""

from __future__ import annotations

import pytest
import torch

from asr_dist import checkpoint as ckpt
from asr_dist.errors import InvalidValue


def save(root, step: int, complete: bool):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    torch.save({"step": step}, d / "states.pt")
    if complete:
        ckpt.mark_complete(d, {"step": step})
    return d


def test_only_complete_checkpoints_count_and_pruning_keeps_the_newest(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    assert ckpt.latest(root) is None and ckpt.complete_checkpoints(root) == []
    for step, complete in ((2, True), (4, False), (10, True), (6, True), (12, False)):
        save(root, step, complete)
    (root / "notes").mkdir()  # not a checkpoint: ignored, never deleted
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-00000002", "step-00000006", "step-00000010"]
    assert ckpt.latest(root).name == "step-00000010"  # the save cut off at step 12 is never loaded
    assert "ignoring incomplete checkpoint" in caplog.text and "step-00000012" in caplog.text
    assert not list(root.glob("*/COMPLETE.tmp"))
    ckpt.prune(root, keep=2)
    # the two newest complete ones stay, an incomplete one older than them goes, a newer one (in progress) stays
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-00000006", "step-00000010", "step-00000012"]


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # a file appears if this is ever unpickled


def test_a_pickle_that_would_run_code_is_refused_naming_the_file(tmp_path):
    good, bad, pwned = tmp_path / "good.pt", tmp_path / "bad.pt", tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "step": 3}, good)
    torch.save({"w": torch.ones(2), "hook": Payload(str(pwned))}, bad)
    assert ckpt.load_safely(good)["step"] == 3
    with pytest.raises(InvalidValue, match="refused for safety") as e, ckpt.refused_as(bad, InvalidValue):
        ckpt.load_safely(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(InvalidValue, match="refused for safety"), ckpt.refused_as(bad, InvalidValue), \
            ckpt.safe_torch_load():
        torch.load(bad, weights_only=False)  # as library code that asks for unsafe loading would
    assert not pwned.exists()
    assert torch.load(good, weights_only=True)["step"] == 3  # torch.load is itself again afterwards
