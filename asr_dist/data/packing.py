"""Packed micro-batches: the utterances of a micro-batch laid end to end in one sequence.

  padded: input_values (B, T) float32, attention_mask (B, T) bool, labels (B, L), keys, durations
     ──pack(align, capacity)──>
  packed: input_values (1, S) float32, utterance i at samples [starts[i], starts[i] + lengths[i]), zeros between;
          starts (B,) and lengths (B,) int64 (samples, on the host); labels (B, L), keys, durations as they were

Every start is a multiple of ``align``: the model's total stride in samples (320 for wav2vec2's feature
encoder), so each utterance's frames fall on the same grid as when it runs alone, and a frame of the packed
sequence that straddles two utterances is one that neither of them has (asr_dist.models.packed drops it).
``capacity`` (samples, a multiple of ``align``) fixes S, so that a run sees only a handful of shapes;
without it S is the packed length rounded up to ``align``. The data layer knows no model: ``align`` is
given by the model family (``ModelFamily.frame_stride``).
"""

from __future__ import annotations

import torch


class PackingError(ValueError):
    """Utterances that do not fit the capacity they were packed for."""


def packed_length(lengths: list[int], align: int) -> int:
    """Samples the packed sequence of utterances of ``lengths`` needs: each starts on a multiple of ``align``."""
    return sum(-(-int(n) // align) * align for n in lengths)


def pack(batch: dict, align: int, capacity: int | None = None) -> dict:
    """A padded micro-batch of 1-D inputs (``collate``'s) laid end to end (see the module's docstring)."""
    x, mask = batch["input_values"], batch["attention_mask"]
    if x.dim() != 2:
        raise PackingError(f"packing takes 1-D audio inputs (B, T), not {tuple(x.shape)}")
    lengths = mask.sum(-1).to(torch.int64)
    need = packed_length(lengths.tolist(), align)
    if capacity is None:
        capacity = need
    if capacity % align or need > capacity:
        raise PackingError(f"{len(lengths)} utterances need {need} samples packed at multiples of {align}; the "
                           f"capacity is {capacity}")
    starts = torch.zeros_like(lengths)
    starts[1:] = torch.cumsum((lengths[:-1] + align - 1) // align * align, 0)
    packed = torch.zeros(1, capacity, dtype=x.dtype)
    for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        packed[0, s:s + n] = x[i, :n]
    return {**{k: v for k, v in batch.items() if k not in ("input_values", "attention_mask")},
            "input_values": packed, "starts": starts, "lengths": lengths}
