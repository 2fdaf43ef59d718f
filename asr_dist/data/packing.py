"""Packed micro-batches: the utterances of a micro-batch laid end to end in one sequence.

  padded: input_values (B, T) float32, attention_mask (B, T) bool, labels (B, L), keys, durations
     ──pack(align, capacity)──>
  packed: input_values (1, S) float32, utterance i at samples [starts[i], starts[i] + lengths[i]), zeros between
          and after;
          starts (B,) and lengths (B,) int64 (samples, on the host); labels (B, L), keys, durations as they were

Every start is a multiple of ``align``: the model's total stride in samples (320 for wav2vec2's feature
encoder), so each utterance's frames fall on the same grid as when it runs alone, and a frame of the packed
sequence that straddles two utterances is one that neither of them has (asr_dist.models.packed drops it).
S is one of a handful of capacities (samples, multiples of ``align``) chosen for the run from every
utterance's length (``choose_capacities``: at most MAX_SHAPES, the largest holding any micro-batch), so that
a run sees only a few shapes; without capacities S is the packed length itself. The data layer knows no model: ``align`` is
given by the model family (``ModelFamily.frame_stride``).
"""

from __future__ import annotations

import numpy as np
import torch

from .batching import cut_by_seconds


class PackingError(ValueError):
    """Utterances that do not fit the capacity they were packed for."""


MAX_SHAPES = 8  # capacities per run: compilation, cuDNN planning and CUDA graphs pay once for each


def round_up(n: int, align: int) -> int:
    return -(-int(n) // align) * align


def packed_length(lengths, align: int) -> int:
    """Samples the packed sequence of utterances of ``lengths`` needs: each starts on a multiple of ``align``."""
    return sum(round_up(n, align) for n in lengths)


def capacity_for(need: int, capacities: tuple[int, ...] | None) -> int:
    """The smallest capacity that holds ``need`` samples (``need`` itself without capacities)."""
    if not capacities:
        return need
    for c in capacities:
        if c >= need:
            return c
    raise PackingError(f"a micro-batch needs {need} samples packed, more than the largest capacity, {capacities[-1]}")


def place(inputs: list[torch.Tensor], align: int, capacities: tuple[int, ...] | None = None) -> dict:
    """1-D inputs end to end: {"input_values": (1, S), "starts": (B,), "lengths": (B,)}, S from ``capacities``."""
    lengths = torch.tensor([len(x) for x in inputs], dtype=torch.int64)
    rounded = (lengths + align - 1) // align * align
    starts = torch.zeros_like(lengths)
    starts[1:] = torch.cumsum(rounded[:-1], 0)
    packed = torch.zeros(1, capacity_for(int(rounded.sum()), capacities), dtype=torch.float32)
    for x, s, n in zip(inputs, starts.tolist(), lengths.tolist()):
        packed[0, s:s + n] = x
    return {"input_values": packed, "starts": starts, "lengths": lengths}


def collate_packed(samples: list[tuple], align: int, capacities: tuple[int, ...] | None,
                   seconds: list[float] | None = None) -> dict:
    """(key, model input, label ids, text) per utterance -> a packed micro-batch (``collate``'s fields, with
    ``starts`` and ``lengths`` in place of ``attention_mask``)."""
    for _, x, _, _ in samples:
        if x.ndim != 1:
            raise PackingError(f"packing takes 1-D audio inputs, not {x.shape}")
    batch = place([torch.from_numpy(x) for _, x, _, _ in samples], align, capacities)
    l_max = max(1, max(len(lab) for _, _, lab, _ in samples))
    labels = torch.full((len(samples), l_max), -100, dtype=torch.long)
    for i, (_, _, lab, _) in enumerate(samples):
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    if seconds is None:
        seconds = [len(x) / 16000 for _, x, _, _ in samples]
    return {**batch, "labels": labels, "keys": [k for k, _, _, _ in samples], "texts": [t for _, _, _, t in samples],
            "durations": torch.tensor(seconds, dtype=torch.float32)}


def pack(batch: dict, align: int, capacity: int | None = None) -> dict:
    """A padded micro-batch of 1-D inputs (``collate``'s) laid end to end (see the module's docstring)."""
    x, mask = batch["input_values"], batch["attention_mask"]
    if x.dim() != 2:
        raise PackingError(f"packing takes 1-D audio inputs (B, T), not {tuple(x.shape)}")
    lengths = mask.sum(-1).tolist()
    if capacity is not None and capacity % align:
        raise PackingError(f"a capacity of {capacity} samples is not a multiple of {align}")
    packed = place([x[i, :n] for i, n in enumerate(lengths)], align, (capacity,) if capacity is not None else None)
    return {**{k: v for k, v in batch.items() if k not in ("input_values", "attention_mask")}, **packed}


# ── capacities ──


def micro_batch_needs(lengths: np.ndarray, align: int, micro_batch_size: int | None = None,
                      micro_batch_seconds: float | None = None) -> np.ndarray:
    """The packed lengths of an epoch's micro-batches as the length plan forms them, near enough: the sorted
    utterances cut into micro-batches of ``micro_batch_size`` neighbours (or, in the large-batch mode, as many
    neighbours as fit ``micro_batch_seconds`` padded)."""
    lengths = np.sort(np.asarray(lengths, dtype=np.int64))
    rounded = (lengths + align - 1) // align * align
    if micro_batch_seconds is None:
        cuts = [(a, min(a + micro_batch_size, len(lengths))) for a in range(0, len(lengths), micro_batch_size)]
    else:
        cuts = cut_by_seconds(lengths.tolist(), micro_batch_seconds)
    sums = np.cumsum(np.concatenate([[0], rounded]))
    return np.array([sums[b] - sums[a] for a, b in cuts], dtype=np.int64)


def largest_need(lengths: np.ndarray, align: int, micro_batch_size: int | None = None,
                 micro_batch_seconds: float | None = None) -> int:
    """The most samples any micro-batch of these utterances can need packed, however they are grouped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if micro_batch_seconds is None:
        longest = np.sort(lengths)[-micro_batch_size:]
        return packed_length(longest.tolist(), align)
    budget = int(micro_batch_seconds * 16000)  # padded samples a micro-batch may hold: n x longest <= budget
    return round_up(budget + (budget // max(1, int(lengths.min())) + 1) * align, align)


def choose_capacities(needs: np.ndarray, largest: int, align: int, max_shapes: int = MAX_SHAPES) -> tuple[int, ...]:
    """At most ``max_shapes`` capacities (samples, multiples of ``align``) for micro-batches that need ``needs``
    samples: the largest is ``largest`` (anything fits it); the others are chosen to waste the fewest samples
    over ``needs`` (each micro-batch takes the smallest capacity that holds it), by dynamic programming over
    at most 256 candidate sizes (quantiles of ``needs``)."""
    largest = round_up(largest, align)
    if max_shapes < 2 or len(needs) == 0:
        return (largest,)
    needs = np.sort(np.minimum(np.asarray(needs, dtype=np.int64), largest))
    candidates = np.unique(np.concatenate([
        [round_up(x, align) for x in np.quantile(needs, np.linspace(0, 1, 256), method="higher")], [largest]]))
    counts = np.diff(np.searchsorted(needs, candidates, side="right"), prepend=0)  # needs at or under each, above the last
    n = len(candidates)
    before = np.concatenate([[0], np.cumsum(counts)])  # needs held by candidates[:i]
    # cost[t][i]: the least total capacity taken by the micro-batches that need at most candidates[i], when
    # candidates[i] is the (t + 1)-th capacity chosen; the last one chosen is always `largest` (candidates[-1])
    inf = np.iinfo(np.int64).max // 4
    cost = np.full((max_shapes, n), inf, dtype=np.int64)
    back = np.zeros((max_shapes, n), dtype=np.int64)
    cost[0] = candidates * before[1:]
    for t in range(1, max_shapes):
        for i in range(t, n):
            # the previous capacity at p < i: the needs of candidates p+1..i take candidates[i]
            total = cost[t - 1, :i] + candidates[i] * (before[i + 1] - before[1:i + 1])
            p = int(np.argmin(total))
            cost[t, i], back[t, i] = total[p], p
    t = int(np.argmin(cost[:, -1]))
    chosen, i = [], n - 1
    while t >= 0:
        chosen.append(int(candidates[i]))
        i, t = int(back[t, i]), t - 1
    return tuple(sorted(set(chosen)))
