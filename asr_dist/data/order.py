"""Epoch order: which utterances each stream (a rank's loader worker) reads, in which order.

Per rank (R ranks, W workers per rank, S streams = R x W):

  index.json shards ──(large-batch mode: split into units, a shard or a 1/k slice of one when shards < S)──>
  ──shuffled by (seed, epoch)──> one sequence of utterances (``epoch_sequence``; a weighted mix gives each
      set its probability's share); stream s reads exactly its quota of it (a fixed utterance count), or
      owns units of about equal audio (large-batch mode, ``unit_owners``); then a reserve, read only when
      damaged samples were skipped, so that a stream never runs dry

A ``StreamLayout`` fixes everything the order depends on; the same layout gives the same order on any
machine, which is what exact resume and the length plan rely on.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random

from .shardset import ShardInfo


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """Everything that fixes the micro-batch sequence of one stream (a rank's worker)."""

    shards: tuple[ShardInfo, ...]
    seed: int
    epoch: int
    rank: int
    world_size: int
    worker: int
    num_workers: int  # streams per rank (1 when the DataLoader has no workers)
    micro_batch_size: int
    num_batches: int  # this stream's quota for the epoch
    bucket_batches: int
    tag: str = ""  # set when an epoch continues under another world size or worker count
    micro_batch_seconds: float | None = None  # large-batch mode: micro-batches filled to this many padded seconds
    sync_buckets: bool = False  # every rank's buffer is cut and ordered alike: a step's micro-batches share a length quantile
    rank_batches: int = 0  # micro-batches of every rank this epoch (all workers): fixes each stream's share of utterances
    mix: tuple = ()  # ShardSet.mix: (name, first shard, end shard, probability) per set of a weighted mix


def unit_owners(layout: StreamLayout) -> tuple[list[tuple[int, int, int]], list[int]]:
    """The epoch's (shard, slice, slices) units in their shuffled order, and the stream that owns each.
    With a fixed utterance count every stream owns as many units (shards hold equal counts); in the
    large-batch mode about the same audio (shards of several corpora can differ many times over)."""
    num_streams = layout.world_size * layout.num_workers
    k = max(1, math.ceil(num_streams / len(layout.shards)))  # split shards when there are too few
    units = [(s, i, k) for s in range(len(layout.shards)) for i in range(k)]
    random.Random(f"units-{layout.seed}-{layout.epoch}{layout.tag}").shuffle(units)
    if layout.micro_batch_seconds is None:
        return units, [j % num_streams for j in range(len(units))]
    return units, _balance([layout.shards[u[0]].audio_seconds / u[2] for u in units], num_streams)


def _units(layout: StreamLayout) -> list[tuple[int, int, int, int]]:
    """This stream's read order for the epoch as (shard, start, stop, step) pieces, samples
    range(start, stop, step) of the shard: its own first, then a reserve, read only if damaged
    samples were skipped, so a stream never runs dry."""
    if layout.micro_batch_seconds is None and layout.rank_batches:
        return _share_of_sequence(layout)
    units, owner = unit_owners(layout)
    num_streams = layout.world_size * layout.num_workers
    stream = layout.rank * layout.num_workers + layout.worker
    pieces = [(s, i, layout.shards[s].num_samples, k) for s, i, k in units]
    own = [u for j, u in enumerate(pieces) if owner[j] == stream]
    others = [u for j, u in enumerate(pieces) if owner[j] != stream]
    shift = (stream * len(others)) // num_streams if others else 0
    return own + others[shift:] + others[:shift]


def epoch_sequence(layout: StreamLayout) -> list[tuple[int, int, int, int]]:
    """The epoch's utterances in order, as (shard, start, stop, 1) pieces: the shards shuffled by (seed,
    epoch). Under a weighted mix the epoch holds as many utterances as all the sets together, of which
    set i gives its probability's share (largest remainders): its shards in a new order each time round,
    as many times round as that takes (fewer than its size: a different part of it each epoch), and the
    pieces of all sets shuffled together."""
    rng = random.Random(f"units-{layout.seed}-{layout.epoch}{layout.tag}")
    if not layout.mix:
        order = list(range(len(layout.shards)))
        rng.shuffle(order)
        return [(s, 0, layout.shards[s].num_samples, 1) for s in order]
    total = sum(sh.num_samples for sh in layout.shards)
    exact = [p * total for _, _, _, p in layout.mix]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[:total - sum(counts)]:
        counts[i] += 1
    pieces = []
    for i, (_, first, end, _) in enumerate(layout.mix):
        need, lap = counts[i], 0
        while need > 0 and end > first:
            order = list(range(first, end))
            random.Random(f"mix-{layout.seed}-{layout.epoch}-{i}-{lap}{layout.tag}").shuffle(order)
            for s in order:
                n = min(need, layout.shards[s].num_samples)
                if n:
                    pieces.append((s, 0, n, 1))
                    need -= n
            lap += 1
    rng.shuffle(pieces)
    return pieces


def _share_of_sequence(layout: StreamLayout) -> list[tuple[int, int, int, int]]:
    """With a fixed utterance count: stream s reads exactly its quota of the epoch's sequence, positions
    [O_s, O_s + Q_s), where O_s adds up the quotas of the streams before it (rank-major, then worker). So
    every utterance is read once an epoch by one stream, whatever the shard count and size. The reserve is
    what no stream reads this epoch (the remainder of a global batch), then the other streams' positions."""
    sequence = epoch_sequence(layout)
    w_count, total, micro = layout.num_workers, layout.rank_batches, layout.micro_batch_size
    quotas = [(total // w_count + (1 if w < total % w_count else 0)) * micro for w in range(w_count)]
    start = layout.rank * total * micro + sum(quotas[:layout.worker])
    end, read = start + quotas[layout.worker], layout.world_size * total * micro
    size = sum(b - a for _, a, b, _ in sequence)

    def pieces(a: int, b: int) -> list[tuple[int, int, int, int]]:
        out, offset = [], 0
        for s, first, stop, _ in sequence:
            n = stop - first
            if offset < b and a < offset + n:
                out.append((s, first + max(a, offset) - offset, first + min(b, offset + n) - offset, 1))
            offset += n
        return out

    return pieces(start, end) + pieces(read, size) + pieces(end, read) + pieces(0, start)


def _balance(sizes: list[float], bins: int) -> list[int]:
    """A bin for each item so that the bins' totals differ by at most the largest item: largest first,
    each to the bin with the least so far (ties to the lowest bin)."""
    owner, heap = [0] * len(sizes), [(0.0, b) for b in range(bins)]
    for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        total, b = heapq.heappop(heap)
        owner[j] = b
        heapq.heappush(heap, (total + sizes[j], b))
    return owner

