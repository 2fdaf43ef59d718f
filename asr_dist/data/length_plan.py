"""The epoch planned from every utterance's length (``data.length_plan``): each step's ranks hold neighbours.

Synchronised buckets give the ranks of a step the same length quantile of their own buffers; how close
those lengths come depends on how many utterances each reader sorts, and at one utterance per rank and
step (64 x 1) a reader's share of a corpus of a few thousand hours is too small for 1.1x. The plan needs
no share at all: every rank learns every utterance's length and byte offsets once at start-up, from the
set's samples.tsv (written by the builder; shards it cannot speak for are listed: tar headers and JSON,
no audio), and every rank computes the same plan from those lengths:

  the epoch's utterances in the loader's order (``epoch_sequence``: shards shuffled by (seed, epoch), or a
  weighted mix), the first world x micro-batches x micro of them (the rest of a global batch is the reserve)
  ──windows of world x workers x bucket_batches x micro utterances──> each window sorted by length (give
  or take LENGTH_JITTER, drawn by (seed, epoch)) and cut into groups of world x micro neighbours, the
  groups shuffled by (seed, epoch, window)
  ──group k──> micro-batch k of the window on every rank: rank r takes the group's utterances r, r + world,
  r + 2 x world, ... (dealt like cards, so that no rank always holds the group's longest end)

So micro-batch g of every rank comes from one group of world x micro neighbours in the sorted window:
the ranks' padded lengths differ by at most the group's spread, and so does a micro-batch's padding
(on 480 utterances, 8 x 4: 1.02x the mean's padded work with 4 % padding, where contiguous slices gave
1.06x and 0.5 %; on 3,438, bench/rank_balance.py: 1.012x, 1.9 %). Micro-batch g is read by worker g % workers, sample by sample at its offset in the
shard (a local read, or one ranged read of a shard at a URL: asr_dist.data.remote), so the streams no longer read shards from start to end. Every utterance of the
epoch's share is delivered once, every rank runs the same number of micro-batches, and the stream's
position is its count of delivered micro-batches (with the skips and reserve stand-ins so far): a
restored loader recomputes the plan and goes on from there.

A damaged sample or one the model cannot align is skipped (``data.on_corrupt=skip``), and a micro-batch
left empty takes a stand-in from the reserve (the utterances this epoch leaves out, then the rest of the
sequence), so every rank still runs the same count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from typing import Iterator

import numpy as np

from ..errors import UserError
from . import index as fmt
from .order import StreamLayout, epoch_sequence
from .samples import BatchMaker, sample_meta
from . import remote
from .shardset import LoaderError, ShardSet, list_samples
from .streams import TrainStream

log = logging.getLogger(__name__)

LENGTH_JITTER = 0.03  # utterances are sorted by length x exp(+-this): the groups change between epochs


@dataclasses.dataclass
class Catalogue:
    """Per shard of a set: each sample's key, length (samples of audio), and where its audio and JSON bytes
    lie, as (offset, size) columns [audio offset, audio size, JSON offset, JSON size]. A sample that could
    not be listed (a damaged shard's rest) or has no audio file has offset -1 in that column."""

    keys: list[list[str]]
    lengths: list[np.ndarray]
    places: list[np.ndarray]  # (n, 4) int64 per shard

    @classmethod
    def list(cls, shards: ShardSet, on_corrupt: str = "stop") -> "Catalogue":
        t0 = time.perf_counter()
        keys, lengths, places = [], [], []
        tables: dict[str, dict] = {}  # per directory: its samples.tsv, by shard name
        listed = 0
        for shard in shards.shards:
            n = shard.num_samples
            directory, name = shard.directory or os.path.dirname(shard.path), shard.name or os.path.basename(shard.path)
            if directory not in tables:
                tables[directory] = fmt.read_sample_table(directory, fmt.read_index(directory))
            known = tables[directory].get(name)
            if known is not None:  # the build wrote each sample's length and offsets down
                keys.append(known[0])
                rows = np.asarray(known[1], dtype=np.int64).reshape(n, 5)
                lengths.append(rows[:, 0].copy())
                places.append(rows[:, 1:].copy())
                continue
            listed += 1
            k, ln, pl = [""] * n, np.zeros(n, dtype=np.int64), np.full((n, 4), -1, dtype=np.int64)
            try:
                locs = list_samples(shard)
            except fmt.ShardError as e:
                if on_corrupt == "stop":
                    raise fmt.ShardError(f"{e} (data.on_corrupt=skip skips such samples)") from None
                log.warning("length plan: %s (its samples are skipped as damaged when their turn comes)", e)
                locs = []
            if len(locs) > n or (len(locs) < n and on_corrupt == "stop"):
                raise LoaderError(f"{shard.path}: {len(locs)} samples in the shard, index.json says {n}; "
                                  f"run `asr-dist shards verify`")
            for i, loc in enumerate(locs):
                try:
                    ln[i] = sample_meta(loc.meta)["num_samples"]
                except ValueError:
                    ln[i] = 0  # the read reports it (data.on_corrupt)
                k[i] = loc.key
                pl[i, :2] = loc.members.get(shards.audio_format, (-1, -1))
                pl[i, 2:] = loc.members.get("json", (-1, -1))
            keys.append(k)
            lengths.append(ln)
            places.append(pl)
        total = sum(len(x) for x in lengths)
        log.info("length plan: %d utterances of %d shards in %.1f s (%d shards listed, the rest from %s)", total,
                 len(shards.shards), time.perf_counter() - t0, listed, fmt.SAMPLES_NAME)
        return cls(keys, lengths, places)


def rank_plan(catalogue: Catalogue, layout: StreamLayout, augment=None) -> tuple[list[np.ndarray], np.ndarray]:
    """This rank's micro-batches of the epoch, in order, as arrays of (shard, sample) rows, and the reserve
    (the epoch's utterances that no rank takes, then the rest of the sequence) as (shard, sample) rows.
    ``augment`` (asr_dist.data.augment.Augmentation): the lengths are those its speed perturbation gives."""
    pieces = epoch_sequence(layout)
    shard_col = np.concatenate([np.full(b - a, s, dtype=np.int64) for s, a, b, _ in pieces])
    sample_col = np.concatenate([np.arange(a, b, dtype=np.int64) for _, a, b, _ in pieces])
    sequence = np.stack([shard_col, sample_col], axis=1)
    micro, world = layout.micro_batch_size, layout.world_size
    group = world * micro
    used = layout.rank_batches * group
    if used > len(sequence):
        raise LoaderError(f"the length plan needs {used} utterances this epoch, the shards hold {len(sequence)}; "
                          "this is a bug")
    first = np.cumsum([0] + [len(x) for x in catalogue.lengths])  # each shard's first row in the flat column
    lengths = np.concatenate(catalogue.lengths)[first[shard_col[:used]] + sample_col[:used]]
    if augment is not None and augment.changes_lengths:
        keys = [catalogue.keys[s][i] for s, i in zip(shard_col[:used].tolist(), sample_col[:used].tolist())]
        lengths = augment.lengths(keys, lengths, layout.epoch)
    lengths = lengths.astype(np.float64)
    # sorted by length give or take LENGTH_JITTER, drawn anew each epoch: where a window holds the whole epoch,
    # exact sorting would put the same utterances together in every epoch
    draw = random.Random(f"jitter-{layout.seed}-{layout.epoch}{layout.tag}").getrandbits(64)
    jitter = np.random.default_rng(draw).uniform(-1, 1, used)
    lengths *= np.exp(LENGTH_JITTER * jitter)
    window = group * layout.num_workers * layout.bucket_batches
    batches = []
    for w, start in enumerate(range(0, used, window)):
        stop = min(used, start + window)
        order = np.lexsort((np.arange(start, stop), lengths[start:stop]))  # by length, then position
        rows = sequence[start:stop][order]
        groups = list(range((stop - start) // group))
        random.Random(f"plan-{layout.seed}-{layout.epoch}-{w}{layout.tag}").shuffle(groups)
        for k in groups:
            batches.append(rows[k * group + layout.rank:(k + 1) * group:world])
    return batches, np.concatenate([sequence[used:], sequence[:used]])


class PlannedStream(TrainStream):
    """A rank's micro-batches of one epoch from the length plan, split over its DataLoader workers
    (micro-batch g to worker g % workers); the same batch keys, state and counters as ``TrainStream``."""

    def __init__(self, catalogue: Catalogue, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.catalogue = catalogue

    def iter_stream(self, w: int) -> Iterator[dict]:
        layout, state = self.layouts[w], dataclasses.replace(self.states[w])
        batches, reserve = rank_plan(self.catalogue, layout, self.augment)
        mine = batches[w::layout.num_workers]
        # cursor: (0, reserve utterances taken as stand-ins so far); skipped_before_buffer: damaged samples so far
        stand_ins = state.cursor[1]
        maker = self.batch_maker(layout, state.skipped_before_buffer)
        readers: dict[int, remote.LocalFile | remote.RangeFile] = {}
        try:
            while state.delivered < len(mine):
                for s, i in mine[state.delivered]:
                    self._read(layout, int(s), int(i), maker, readers)
                while not maker.samples:  # every utterance of it was damaged: a stand-in from the reserve
                    if stand_ins >= len(reserve):
                        raise LoaderError(f"rank {layout.rank}: no readable utterance left to stand in for a "
                                          f"damaged micro-batch (every one of the epoch was tried)")
                    s, i = reserve[(stand_ins + w * len(reserve) // layout.num_workers) % len(reserve)]
                    stand_ins += 1
                    self._read(layout, int(s), int(i), maker, readers)
                batch = maker.take()
                state.delivered += 1
                yield self._deliver(batch, w, state, maker.skipped, cursor=(0, stand_ins),
                                    skipped_before_buffer=maker.skipped)
        finally:
            for reader in readers.values():
                reader.close()

    def _read(self, layout, s: int, i: int, maker: BatchMaker, readers: dict) -> None:
        """Add sample i of shard s to the micro-batch being formed, or count it as skipped."""
        path, cat = layout.shards[s].path, self.catalogue
        key = cat.keys[s][i]
        audio_at, audio_size, json_at, json_size = (int(x) for x in cat.places[s][i])
        if not key:
            maker.bad(path, f"#{i}", "it could not be listed (the shard is damaged there)")
            return
        if not self.decode and self.alignable is None:  # planning: the catalogue has the lengths
            maker.add_length(s, key, int(cat.lengths[s][i]))
            return
        try:
            if audio_at < 0 or json_at < 0:
                raise KeyError(self.audio_format if audio_at < 0 else "json")
            reader = readers.get(s)
            if reader is None:
                reader = readers[s] = remote.open_reader(layout.shards[s])
            meta_bytes, audio_bytes = reader.pread_spans([(json_size, json_at), (audio_size, audio_at)])
            if len(meta_bytes) != json_size or len(audio_bytes) != audio_size:
                raise fmt.ShardError(f"{path}: sample {key} is cut short (the shard changed since it was listed?)")
            meta = sample_meta(meta_bytes)
        except (KeyError, ValueError) as e:
            maker.bad(path, key, f"no .{self.audio_format} or unreadable JSON ({e})")
            return
        except fmt.ShardError as e:
            maker.bad(path, key, str(e))
        except UserError:
            raise  # a URL that cannot be read stops the run (asr_dist.data.remote); it is no damaged sample
        except OSError as e:
            maker.bad(path, key, str(e))
            return
        maker.add(path, s, key, audio_bytes, meta)
