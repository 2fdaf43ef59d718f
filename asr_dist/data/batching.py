"""Batch arithmetic: how utterances become optimizer steps, checked before anything is read.

  global batch = micro-batch x accumulation x world size
      utterances (data.global_batch_size, data.micro_batch_size), or in the large-batch mode seconds of
      audio (data.global_batch_seconds, data.micro_batch_seconds), padding included
  steps per epoch = utterances in index.json // global batch   (large-batch mode: audio seconds // global seconds)

Every rank yields exactly steps_per_epoch x accumulation micro-batches per epoch: unequal counts hang
NCCL collectives. A reader sorts ``bucket_batches`` micro-batches at a time by length
(``default_bucket_batches``); ``cut_by_seconds`` cuts length-sorted utterances into micro-batches of
the large-batch mode.
"""

from __future__ import annotations

from ..audio import SAMPLE_RATE
from .shardset import LoaderError

def check_batch_sizes(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps; a clear error when the sizes do not divide."""
    per_step = micro_batch_size * world_size
    if micro_batch_size < 1 or global_batch_size % per_step:
        good = [m for m in range(1, global_batch_size + 1) if global_batch_size % (m * world_size) == 0]
        raise LoaderError(
            f"global batch {global_batch_size} is not a multiple of micro batch {micro_batch_size} x world size "
            f"{world_size}; micro batch sizes that divide it on {world_size} rank(s): {good or 'none'} "
            f"(or change data.global_batch_size)"
        )
    return global_batch_size // per_step


def check_batch_seconds(global_batch_seconds: float, micro_batch_seconds: float, world_size: int) -> int:
    """Gradient accumulation steps of the large-batch mode (micro-batches filled to a number of seconds)."""
    if not micro_batch_seconds > 0 or not global_batch_seconds > 0:
        raise LoaderError("data.micro_batch_seconds and data.global_batch_seconds must both be set, above 0")
    per_step = micro_batch_seconds * world_size
    accumulation = round(global_batch_seconds / per_step)
    if accumulation < 1 or abs(accumulation * per_step - global_batch_seconds) > 1e-6 * global_batch_seconds:
        good = [global_batch_seconds / (a * world_size) for a in range(1, 9)]
        raise LoaderError(
            f"data.global_batch_seconds {global_batch_seconds:g} is not a multiple of data.micro_batch_seconds "
            f"{micro_batch_seconds:g} x world size {world_size}; micro-batch seconds that divide it on {world_size} "
            f"rank(s): {', '.join(f'{g:g}' for g in good)} … (or change data.global_batch_seconds)")
    return accumulation


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int,
                       micro_batch_seconds: float | None = None, global_batch_seconds: float | None = None) -> int:
    """Micro-batches per rank per optimizer step: of utterances, or of seconds in the large-batch mode."""
    if micro_batch_seconds is None and global_batch_seconds is None:
        return check_batch_sizes(global_batch_size, micro_batch_size, world_size)
    return check_batch_seconds(global_batch_seconds, micro_batch_seconds, world_size)


MIN_BUCKET_UTTERANCES = 1024  # what a reader sorts at a time by default (see default_bucket_batches)


def default_bucket_batches(micro_batch_size: int, micro_batch_seconds: float | None = None) -> int:
    """Micro-batches per bucketing buffer when data.bucket_batches is not set: 32, and with a fixed
    utterance count at least enough for MIN_BUCKET_UTTERANCES utterances. With synchronised buckets the
    ranks of a step take the same length quantile of their own buffers, and how closely those lengths
    agree grows with the buffer: on a log-normal 1.5-15 s mix, 128 utterances a buffer leave the slowest
    of 8 ranks 1.12x the mean's work, 1024 leave 1.04x (bench/rank_balance.py). Memory: the buffer holds
    compressed audio, about 100 kB per utterance of 5.5 s in FLAC, per loader worker."""
    if micro_batch_seconds is not None:
        return 32
    return max(32, -(-MIN_BUCKET_UTTERANCES // max(1, micro_batch_size)))


def cut_by_seconds(lengths: list[int], seconds: float, pad_to_multiple_of: int = 1) -> list[tuple[int, int]]:
    """Cut utterances sorted by length (samples, ascending) into consecutive micro-batches whose padded
    size, utterances x longest (rounded up to ``pad_to_multiple_of``), stays within ``seconds`` of audio:
    (start, end) index pairs. An utterance longer than that alone is a micro-batch of its own."""
    budget = seconds * SAMPLE_RATE
    cuts, start = [], 0
    for i, n in enumerate(lengths):
        padded = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if i > start and (i - start + 1) * padded > budget:
            cuts.append((start, i))
            start = i
    if start < len(lengths):
        cuts.append((start, len(lengths)))
    return cuts

