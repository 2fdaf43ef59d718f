"""asr_dist.data.packing: micro-batches laid end to end on the frame grid, at a handful of capacities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asr_dist.data.loader import TrainLoader
from asr_dist.data.packing import (MAX_SHAPES, PackingError, capacity_for, choose_capacities, largest_need,
                                   micro_batch_needs, pack, packed_length)
from asr_dist.data.samples import collate

LENGTHS = [16000, 9000, 23456, 4321]  # samples: starts off the frame grid, and a short one


def _batch(lengths=LENGTHS, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return collate([(f"u{i}", rng.standard_normal(n).astype(np.float32), [3] * (4 + i), "")
                    for i, n in enumerate(lengths)])


def test_pack_lays_utterances_on_the_frame_grid():
    b = _batch()
    p = pack(b, align=320)
    assert p["starts"].tolist() == [0, 16000, 25280, 48960] and p["lengths"].tolist() == LENGTHS
    assert p["input_values"].shape == (1, packed_length(LENGTHS, 320)) == (1, 48960 + 4480)
    for i, (s, n) in enumerate(zip(p["starts"].tolist(), LENGTHS)):
        assert torch.equal(p["input_values"][0, s:s + n], b["input_values"][i, :n])
    assert float(p["input_values"][0, 9000 + 16000:25280].abs().sum()) == 0  # the gap is silence
    assert p["keys"] == b["keys"] and torch.equal(p["labels"], b["labels"]) and "attention_mask" not in p
    assert pack(b, 320, capacity=64000)["input_values"].shape == (1, 64000)
    with pytest.raises(PackingError, match="needs 53440 samples packed, more than the largest capacity, 48000"):
        pack(b, 320, capacity=48000)


def test_a_handful_of_capacities_hold_every_micro_batch_with_little_padding():
    """A log-normal 1.5-15 s corpus of 20,000 utterances in micro-batches of 16 neighbours: 8 capacities, the
    largest holds the 16 longest; the padding they leave is measured against the exact packed lengths."""
    rng = np.random.default_rng(0)
    lengths = (np.clip(rng.lognormal(np.log(5.0), 0.6, 20000), 1.5, 15.0) * 16000).astype(np.int64)
    needs = micro_batch_needs(lengths, 320, micro_batch_size=16)
    largest = largest_need(lengths, 320, micro_batch_size=16)
    caps = choose_capacities(needs, largest, 320)
    assert len(caps) == MAX_SHAPES and caps[-1] == largest == packed_length(np.sort(lengths)[-16:], 320)
    assert all(c % 320 == 0 for c in caps)
    used = np.array([capacity_for(int(n), caps) for n in needs])
    padding = 1 - needs.sum() / used.sum()
    assert padding < 0.15, padding
    # the dynamic programme beats capacities spaced evenly in ratio between the smallest need and the largest
    geometric = tuple(int(-(-x // 320) * 320) for x in np.geomspace(needs.min(), largest, MAX_SHAPES))
    assert used.sum() < sum(capacity_for(int(n), geometric) for n in needs)
    # the large-batch mode: micro-batches filled to 600 s padded fit one or a few capacities nearly exactly
    needs = micro_batch_needs(lengths, 320, micro_batch_seconds=600)
    caps = choose_capacities(needs, largest_need(lengths, 320, micro_batch_seconds=600), 320)
    used = np.array([capacity_for(int(n), caps) for n in needs])
    assert 1 - needs.sum() / used.sum() < 0.02


def test_the_loader_packs_an_epoch_at_its_capacities(train_shards):
    """Every micro-batch of an epoch (decoded, as training gets them) is packed at one of the loader's
    capacities, with each utterance where starts and lengths say; the same utterances as unpacked."""
    args = dict(rank=0, world_size=1, micro_batch_size=4, global_batch_size=8, num_workers=0, length_plan=True)
    packed = TrainLoader(str(train_shards / "s-train"), pack_align=320, **args)
    plain = TrainLoader(str(train_shards / "s-train"), **args)
    caps = packed.capacities
    assert 1 <= len(caps) <= MAX_SHAPES and plain.capacities is None
    shapes, keys = set(), []
    for b, u in zip(packed, plain):
        assert b["keys"] == u["keys"] and b["input_values"].shape[1] in caps
        shapes.add(b["input_values"].shape[1])
        for i, (s, n) in enumerate(zip(b["starts"].tolist(), b["lengths"].tolist())):
            assert s % 320 == 0 and n == int(u["attention_mask"][i].sum())
            assert torch.equal(b["input_values"][0, s:s + n], u["input_values"][i, :n])
        keys += b["keys"]
    assert len(keys) == 96 and len(set(keys)) == 96 and len(shapes) <= MAX_SHAPES


def test_the_capacities_are_the_best_choice_of_their_candidates():
    """The dynamic programme against every choice of capacities among the same candidate sizes, on small cases:
    it takes no more samples than the best of them (with the largest always among them)."""
    import itertools

    rng = np.random.default_rng(1)
    for case in range(40):
        needs = rng.integers(1, 60, rng.integers(3, 30)) * 320
        largest = int(needs.max()) + 320 * int(rng.integers(0, 3))
        shapes = int(rng.integers(2, 5))
        caps = choose_capacities(needs, largest, 320, max_shapes=shapes)
        assert caps[-1] == largest and len(caps) <= shapes
        got = sum(capacity_for(int(n), caps) for n in needs)
        candidates = sorted(set(int(n) for n in needs) - {largest})
        best = min(sum(capacity_for(int(n), (*sorted(c), largest)) for n in needs)
                   for k in range(shapes) for c in itertools.combinations(candidates, k))
        assert got == best, (case, caps, got, best)
