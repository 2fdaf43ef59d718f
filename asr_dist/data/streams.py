"""The streaming reader: one stream (a rank's loader worker) reads its share of the epoch's order and
makes length-bucketed micro-batches.

  the stream's units in order (asr_dist.data.order), read shard by shard from the start
  ──per stream: buffer of bucket_batches x micro utterances (compressed bytes + JSON)──>
  ──sort by length, cut into micro-batches, shuffle them (seed, epoch, worker, buffer; + rank unless synchronised)──>
  ──each sample checked, decoded, featurised and collated (asr_dist.data.samples)──>
      micro-batch (B, T) or (B, F, D) in the worker, with the stream's state after it

Synchronised buckets (the default with a fixed utterance count): every rank's buffer b of worker w
holds as many utterances, cut into as many micro-batches, shuffled in one order shared by the ranks,
so the ranks' j-th micro-batches are the same length quantile of their buffers and a step's ranks
do about the same work (each rank waits for the slowest; Lhotse's ``sync_buckets``). The last
buffer of an epoch holds only what the quota still takes.
In the large-batch mode (``micro_batch_seconds``) a buffer holds bucket_batches x that many seconds
of audio and is cut into micro-batches of as many utterances as fit (utterances x longest, padding
included; ``cut_by_seconds``).

Each micro-batch carries its stream's position after it (buffer start, buffer number, batches
taken from the buffer), so a new stream given that ``StreamState`` reproduces the rest of the epoch
exactly: it re-reads the buffer from its start (at most about one shard per worker), redoes the same
sort and shuffle, and skips what was already delivered.
B: utterances, T: samples of 16 kHz audio, F: feature frames of D values.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Iterator

import torch

from ..audio import SAMPLE_RATE, normalize
from ..errors import UserError
from . import index as fmt
from . import remote
from .augment import EpochAugment
from .batching import cut_by_seconds
from .order import StreamLayout, _units
from .samples import BatchMaker, sample_meta

log = logging.getLogger(__name__)


def _unit_samples(layout: StreamLayout, unit: tuple[int, int, int, int], skip: int, on_corrupt: str,
                  maker: BatchMaker) -> Iterator[tuple[str, dict]]:
    shard = layout.shards[unit[0]]
    first, stop, step = unit[1:]
    j = 0
    try:
        with _open_shard(shard) as f:
            for n, (key, files) in enumerate(fmt.iter_shard(shard.path, fileobj=f)):
                if n >= stop:
                    break
                if n < first or (n - first) % step:
                    continue
                j += 1
                if j <= skip:
                    continue
                yield key, files
    except fmt.ShardError as e:
        if on_corrupt == "stop":
            raise
        in_unit = len(range(first, min(stop, shard.num_samples), step))  # this unit's share of the shard's samples
        lost = max(0, in_unit - max(j, skip))
        maker.skipped += lost
        log.warning("skipping the rest of a damaged shard (%d samples of this stream): %s", lost, e)


def _open_shard(shard):
    """The shard as a stream from its start (asr_dist.data.remote.open_stream); a local file that cannot be
    opened is a damaged shard (data.on_corrupt), a URL that cannot be read stops the run."""
    try:
        return remote.open_stream(shard)
    except UserError:
        raise
    except OSError as e:
        raise fmt.ShardError(f"{shard.path}: unreadable after sample (start of shard): {e}") from None


@dataclasses.dataclass
class StreamState:
    """Position of a stream after its last delivered micro-batch."""

    cursor: tuple[int, int] = (0, 0)  # (unit position, samples of that unit already taken) at the buffer's start
    buffer_index: int = 0
    taken_from_buffer: int = 0
    delivered: int = 0
    skipped_before_buffer: int = 0  # damaged samples this stream skipped this epoch before the buffer's fill
    skipped_in_buffer: int = 0  # and in the buffer's batches already delivered (not decoded again on resume)
    delivered_from_buffer: int = 0  # micro-batches delivered from this buffer (fewer than taken if one was all damaged)


class TrainStream(torch.utils.data.IterableDataset):
    """The micro-batches of one rank for one epoch, split over its DataLoader workers."""

    def __init__(self, layouts: list[StreamLayout], states: list[StreamState], vocab: dict[str, int],
                 audio_format: str, on_corrupt: str = "stop", pad_to_multiple_of: int = 1, decode: bool = True,
                 featurize=normalize, alignable=None, packing: tuple | None = None, augment=None):
        self.layouts, self.states = layouts, states
        self.augment = augment  # asr_dist.data.augment.Augmentation of the training audio; None: as read
        self.packing = packing  # (align, capacities): packed micro-batches (asr_dist.data.packing); None: padded
        self.alignable = alignable  # (num_samples, label ids) -> (model frames, frames needed); None: no check
        self.vocab, self.audio_format = vocab, audio_format
        self.on_corrupt, self.pad_to_multiple_of = on_corrupt, pad_to_multiple_of
        self.decode = decode  # False: micro-batches of keys and lengths only, from the JSON (planning, benchmarks)
        self.featurize = featurize  # the model family's: audio (T,) -> its input (picklable: it goes to the workers)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        return self.iter_stream(w)

    def batch_maker(self, layout: StreamLayout, skipped: int) -> BatchMaker:
        """The stream's micro-batches in the making, ``skipped`` samples skipped so far this epoch."""
        return BatchMaker(self.vocab, on_corrupt=self.on_corrupt, pad_to_multiple_of=self.pad_to_multiple_of,
                          decode=self.decode, featurize=self.featurize, alignable=self.alignable,
                          num_samples=sum(s.num_samples for s in layout.shards), skipped=skipped,
                          packing=self.packing,
                          augment=None if self.augment is None else EpochAugment(self.augment, layout.epoch))

    @staticmethod
    def _deliver(batch: dict, w: int, state: StreamState, skipped: int, **position) -> dict:
        """``batch`` with its place in the stream, the stream's state after it (``position``: the fields that
        differ from ``state``'s) and the samples the stream skipped so far this epoch."""
        batch["stream"] = (w, state.delivered - 1)
        batch["state"] = dataclasses.asdict(dataclasses.replace(state, **position))
        batch["skipped_samples"] = skipped
        return batch

    def iter_stream(self, w: int) -> Iterator[dict]:
        layout, state = self.layouts[w], dataclasses.replace(self.states[w])
        units = _units(layout)
        # after a restore the buffer is filled again (a damaged shard's loss is counted again: so it is left
        # out of the saved count), but its delivered batches are not decoded again (their skips are carried)
        maker = self.batch_maker(layout, state.skipped_before_buffer)
        carried = state.skipped_in_buffer
        by_seconds = layout.micro_batch_seconds is not None
        # the buffer holds bucket_batches micro-batches: of micro_batch_size utterances, or of micro_batch_seconds
        full_buffer = layout.bucket_batches * (layout.micro_batch_seconds * SAMPLE_RATE if by_seconds
                                               else layout.micro_batch_size)
        pos, taken = state.cursor  # unit position, samples taken from that unit
        reader = None
        while state.delivered < layout.num_batches:
            start = (pos, taken)
            buffer_size = full_buffer
            if not by_seconds:  # the epoch's last buffer holds only what the quota still takes: nothing read is left over
                left = layout.num_batches - (state.delivered - state.delivered_from_buffer)
                buffer_size = min(full_buffer, left * layout.micro_batch_size)
            before_buffer = maker.skipped
            buffer: list[tuple[str, bytes, dict, int, int]] = []  # key, audio, JSON, shard, length
            filled = 0  # utterances, or samples of audio in the large-batch mode
            while filled < buffer_size:
                if reader is None:  # opened once per unit; skipping only happens after a restore
                    reader = _unit_samples(layout, units[pos % len(units)], taken, self.on_corrupt, maker)
                item = next(reader, None)
                if item is None:
                    reader, pos, taken = None, pos + 1, 0
                    continue
                taken += 1
                key, files = item
                try:
                    meta = sample_meta(files["json"])
                    # the length it will be delivered at (speed perturbation), which sorting and cutting go by
                    sample = (key, files[self.audio_format], meta, units[pos % len(units)][0],
                              maker.length(key, meta["num_samples"]))
                    filled += sample[4] if by_seconds else 1
                    buffer.append(sample)
                except (KeyError, ValueError) as e:
                    maker.bad(layout.shards[units[pos % len(units)][0]].path, key,
                              f"no .{self.audio_format} or unreadable JSON ({e})")
            # similar lengths together: the padding of a micro-batch is what its longest utterance adds
            buffer.sort(key=lambda s: (s[4], s[0]))
            if by_seconds:
                cuts = cut_by_seconds([n for _, _, _, _, n in buffer], layout.micro_batch_seconds,
                                      self.pad_to_multiple_of)
                batches = [buffer[a:b] for a, b in cuts]
            else:
                batches = [buffer[i:i + layout.micro_batch_size] for i in range(0, buffer_size, layout.micro_batch_size)]
            # synchronised: one order for this buffer on every rank. Every rank's buffer b of worker w is cut into
            # as many micro-batches, sorted by length, so the j-th micro-batch of every rank is the same length
            # quantile of a buffer drawn from the same corpus: the ranks of a step hold similar lengths
            who = "" if layout.sync_buckets else f"-{layout.rank}"
            rng = random.Random(f"batches-{layout.seed}-{layout.epoch}{who}-{w}-{state.buffer_index}{layout.tag}")
            rng.shuffle(batches)
            after_fill = maker.skipped
            maker.skipped += carried
            carried = 0
            for b in range(state.taken_from_buffer, len(batches)):
                if state.delivered == layout.num_batches:
                    break
                for key, data, meta, shard, _ in batches[b]:
                    maker.add(layout.shards[shard].path, shard, key, data, meta)
                state.taken_from_buffer = b + 1
                if not maker.samples:
                    continue  # every utterance of it was damaged and skipped: the next batch stands in
                batch = maker.take()
                state.delivered += 1
                state.delivered_from_buffer += 1
                yield self._deliver(batch, w, state, maker.skipped, cursor=start, skipped_before_buffer=before_buffer,
                                    skipped_in_buffer=maker.skipped - after_fill)
            state.buffer_index += 1
            state.taken_from_buffer = state.delivered_from_buffer = 0
