"""The resumable training loader: per rank, equal length-bucketed micro-batches and exact resume.

Per rank (R ranks, W workers per rank, S streams = R x W):

  shard set (asr_dist.data.shardset) ──epoch order of each stream (asr_dist.data.order)──>
  ──W streams (asr_dist.data.streams; or the length plan, asr_dist.data.length_plan), each in a loader worker──>
      micro-batches (B, T) or (B, F, D), or packed (1, S) with starts and lengths (keys: asr_dist.data.samples)
  ──DataLoader (batch_size=None)──> reordered into the canonical order g -> (worker g % W, g // W)

Every rank yields exactly steps_per_epoch x accumulation micro-batches per epoch (asr_dist.data.batching):
unequal counts hang NCCL collectives. In the large-batch mode (``micro_batch_seconds``) an epoch's steps
hold a little less than all the audio (padding); the rest comes in a later epoch's order.

``state_dict`` after any batch holds every stream's position after its last delivered micro-batch, so a
new loader reproduces the rest of the epoch exactly; under another world size, worker count or batch
layout, the epoch's remaining steps continue in a new deterministic order.
B: utterances, T: samples of 16 kHz audio, F: feature frames of D values.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Iterator

import numpy as np
import torch

from ..audio import SAMPLE_RATE, normalize
from .batching import accumulation_steps, default_bucket_batches
from .length_plan import Catalogue, PlannedStream
from .order import StreamLayout
from .packing import choose_capacities, largest_need, micro_batch_needs
from .samples import LabelEncoder
from .shardset import LoaderError, ShardSet, list_samples
from .streams import StreamState, TrainStream
from .worker_signals import loader_worker_init, worker_context

log = logging.getLogger(__name__)


class TrainLoader:
    """Equal, length-bucketed micro-batches on every rank, with exact resume.

    ``rank`` and ``world_size`` are passed in (asr_dist.distributed reads the environment).
    Each iteration is one epoch and moves the loader on to the next (``set_epoch`` jumps to another).
    ``sync_buckets``: with streamed batches (no length plan; the large-batch mode too), the micro-batches
    that the ranks run in the same step come from the same length quantile of their buffers, so no rank
    waits long for another. ``pack_align``: micro-batches packed (asr_dist.data.packing), each utterance
    starting on a multiple of it, at ``capacities``."""

    def __init__(self, shards: ShardSet | str | list, *, rank: int, world_size: int, micro_batch_size: int,
                 global_batch_size: int = 32, num_workers: int = 2, seed: int = 0, bucket_batches: int | None = None,
                 on_corrupt: str = "stop", pin_memory: bool = False, pad_to_multiple_of: int = 1,
                 prefetch_factor: int = 4, micro_batch_seconds: float | None = None,
                 global_batch_seconds: float | None = None, sync_buckets: bool = True, featurize=normalize,
                 alignable=None, length_plan: bool = False, pack_align: int | None = None, augment=None):
        # augment: asr_dist.data.augment.Augmentation, applied in the workers (speed perturbation changes lengths,
        # which the plan, the buckets and the packing capacities take into account); None: the audio as read
        self.augment = augment
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet.open(shards)
        self.featurize = featurize  # audio (T,) -> the model's input, in the workers: the model family's featurizer()
        # alignable: the model's picklable check (asr_dist.frames.AlignmentCheck); utterances it refuses are skipped
        self.alignable = alignable
        if on_corrupt not in ("stop", "skip"):
            raise LoaderError(f"data.on_corrupt={on_corrupt!r}: choose stop or skip")
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.micro_batch_seconds, self.global_batch_seconds = micro_batch_seconds, global_batch_seconds
        where = ", ".join(self.shards.dirs)
        if self.shards.mix and micro_batch_seconds is not None:
            raise LoaderError("a weighted mix of shard sets needs a fixed utterance count (data.micro_batch_size); "
                              "the large-batch mode reads a plain list of shard directories")
        self.accumulation = accumulation_steps(global_batch_size, micro_batch_size, world_size, micro_batch_seconds,
                                               global_batch_seconds)
        if micro_batch_seconds is None:
            self.steps_per_epoch = self.shards.num_samples // global_batch_size
            if self.steps_per_epoch == 0:
                raise LoaderError(f"{self.shards.num_samples} utterances in {where} are fewer than one global "
                                  f"batch of {global_batch_size}; lower data.global_batch_size or add data")
        else:  # large-batch mode: an epoch is as many steps as the audio fills
            longest = self.shards.max_seconds
            stretch = augment.longest_stretch if augment is not None else 1.0  # the smallest augment.speed_factors
            if longest is not None and longest * stretch > micro_batch_seconds:
                slowed = (f", {longest * stretch:g} s once slowed down by augment.speed_factors' smallest "
                          f"({1 / stretch:g})" if stretch > 1 else "")
                raise LoaderError(f"data.micro_batch_seconds={micro_batch_seconds:g}: {where} has utterances of up to "
                                  f"{longest:g} s (index.json's duration histogram){slowed}, longer than a micro-batch; "
                                  f"raise it or rebuild the shards with --max-duration "
                                  f"{micro_batch_seconds / stretch:g}")
            self.steps_per_epoch = int(self.shards.audio_seconds // global_batch_seconds)
            if self.steps_per_epoch == 0:
                raise LoaderError(f"{self.shards.audio_seconds:.0f} s of audio in {where} is less than one global "
                                  f"batch of {global_batch_seconds:g} s; lower data.global_batch_seconds or add data")
        if bucket_batches is None:
            bucket_batches = default_bucket_batches(micro_batch_size, micro_batch_seconds)
        if bucket_batches < 1:
            raise LoaderError(f"data.bucket_batches={bucket_batches}: give 1 (no bucketing) or more")
        self.num_workers, self.seed, self.bucket_batches = num_workers, seed, bucket_batches
        self.sync_buckets = sync_buckets
        if length_plan and micro_batch_seconds is not None:
            raise LoaderError("data.length_plan=true plans a fixed utterance count per micro-batch (data.micro_batch_size); "
                              "leave data.micro_batch_seconds out, or set data.length_plan=false")
        if length_plan and not self.shards.random_access:
            log.warning("%s: the server gives no byte ranges, so the length plan cannot read utterances at their "
                        "offsets; the loader streams whole shards instead (data.length_plan=false). Set data.cache_dir "
                        "to a node-local directory to fetch each shard once and plan by length", where)
            length_plan = False
        self.length_plan = length_plan
        self._catalogue = None  # length plan: every shard's samples, listed once (asr_dist.data.length_plan)
        # packed micro-batches (data.pack): utterances start on multiples of pack_align samples, and each
        # micro-batch takes the smallest of a handful of capacities, chosen from every utterance's length
        self.pack_align = pack_align
        self._capacities: tuple[int, ...] | None = None
        self.on_corrupt, self.pin_memory, self.pad_to_multiple_of = on_corrupt, pin_memory, pad_to_multiple_of
        self.prefetch_factor = prefetch_factor
        streams = max(1, num_workers) * world_size
        if len(self.shards.shards) < streams:
            log.warning(
                "%d shards for %d ranks x %d workers = %d readers: shards are split so that every reader gets "
                "its share, but each reader scans whole shards; build with a smaller --shard-size for at least "
                "%d shards", len(self.shards.shards), world_size, max(1, num_workers), streams, streams)
        self.epoch = 0
        self._consumed = 0  # micro-batches of this epoch delivered to the caller
        self._states: dict[int, dict] = {}
        self._tag = ""
        self._quota_steps = self.steps_per_epoch
        self.skipped_samples = 0  # damaged samples skipped on this rank (data.on_corrupt=skip), all epochs
        # utterances and audio seconds this rank has delivered from each set of a mix (all of it: one set), all epochs
        names = self.shards.mix_names or ["all"]
        self._set_of_shard = [0] * len(self.shards.shards)
        for i, (_, first, end, _) in enumerate(self.shards.mix):
            self._set_of_shard[first:end] = [i] * (end - first)
        self.mix_seen = [[0, 0.0] for _ in names]
        self.mix_names = names
        self._skipped: dict[int, int] = {}
        self._skipped_before = 0

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def __len__(self) -> int:
        """Micro-batches left to deliver in the current epoch."""
        return self._quota_steps * self.accumulation - self._offset_consumed()

    def _offset_consumed(self) -> int:
        return self._consumed - (self.steps_per_epoch - self._quota_steps) * self.accumulation

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._consumed, self._states, self._tag = epoch, 0, {}, ""
            self._quota_steps = self.steps_per_epoch

    def _layouts(self) -> tuple[list[StreamLayout], list[StreamState]]:
        w_count = max(1, self.num_workers)
        total = self._quota_steps * self.accumulation
        layouts, states = [], []
        for w in range(w_count):
            quota = total // w_count + (1 if w < total % w_count else 0)
            layouts.append(StreamLayout(tuple(self.shards.shards), self.seed, self.epoch, self.rank, self.world_size,
                                        w, w_count, self.micro_batch_size, quota, self.bucket_batches, self._tag,
                                        self.micro_batch_seconds, self.sync_buckets, total, self.shards.mix))
            s = self._states.get(w)
            states.append(StreamState(tuple(s["cursor"]), s["buffer_index"], s["taken_from_buffer"], s["delivered"],
                                      s.get("skipped_before_buffer", 0), s.get("skipped_in_buffer", 0),
                                      s.get("delivered_from_buffer", s["taken_from_buffer"]))
                          if s else StreamState())
        return layouts, states

    def catalogue(self) -> Catalogue:
        """Every shard's samples and lengths, listed once (from samples.tsv where the set has it)."""
        if self._catalogue is None:
            self._catalogue = Catalogue.list(self.shards, self.on_corrupt)
        return self._catalogue

    def use_catalogue(self, catalogue: Catalogue | None) -> None:
        """Take the shards' listing another loader of the same set made (None: list them when needed)."""
        self._catalogue = catalogue or self._catalogue

    def lengths(self) -> np.ndarray:
        """Every utterance's length in samples as an epoch may deliver it: at the slowest speed perturbation
        (augment.speed_*), so that the longest any epoch holds; damaged samples (length unknown) left out."""
        lengths = np.concatenate(self.catalogue().lengths)
        lengths = lengths[lengths > 0]  # a damaged sample's length is unknown (0): it is skipped when read
        if self.augment is not None and self.augment.changes_lengths:
            lengths = np.ceil(lengths * self.augment.longest_stretch).astype(np.int64)
        return lengths

    @property
    def capacities(self) -> tuple[int, ...] | None:
        """data.pack: the packed micro-batches' sizes in samples (at most MAX_SHAPES, the same on every rank and
        in every epoch: chosen from every utterance's length); None when not packing."""
        if self.pack_align is None:
            return None
        if self._capacities is None:
            lengths = self.lengths()
            args = dict(micro_batch_size=self.micro_batch_size, micro_batch_seconds=self.micro_batch_seconds)
            self._capacities = choose_capacities(micro_batch_needs(lengths, self.pack_align, **args),
                                                 largest_need(lengths, self.pack_align, **args), self.pack_align)
            if self.rank == 0:
                log.info("packed micro-batches: capacities %s s of audio", ", ".join(
                    f"{c / SAMPLE_RATE:.1f}" for c in self._capacities))
        return self._capacities

    def _stream(self, layouts: list[StreamLayout], states: list[StreamState], decode: bool) -> TrainStream:
        args = (layouts, states, self.shards.vocab, self.shards.audio_format, self.on_corrupt, self.pad_to_multiple_of)
        kwargs = dict(decode=decode, featurize=self.featurize, alignable=self.alignable,
                      packing=None if self.pack_align is None else (self.pack_align, self.capacities),
                      augment=self.augment)
        if not self.length_plan:
            return TrainStream(*args, **kwargs)
        return PlannedStream(self.catalogue(), *args, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        layouts, states = self._layouts()
        ds = self._stream(layouts, states, decode=True)
        w_count = len(layouts)
        if self.num_workers > 0:
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                             prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                             # forked from a clean server, not from the trainer: forking the
                                             # trainer each epoch made its next steps pay copy-on-write
                                             # faults (measured: the step window after each epoch start ran at
                                             # 60-70 % speed with fork, at full speed with forkserver)
                                             multiprocessing_context=worker_context(),
                                             worker_init_fn=functools.partial(loader_worker_init, os.getpid()))
            source = iter(dl)
        else:
            source = ds.iter_stream(0)
        # DataLoader takes workers in turn; after a restore the turn may start elsewhere, so put the
        # batches in the canonical order: g -> (worker g % W, its batch g // W)
        pending: dict[tuple[int, int], dict] = {}
        offset = self._offset_consumed()
        for g in range(offset, self._quota_steps * self.accumulation):
            want = (g % w_count, g // w_count)
            while want not in pending:
                try:
                    batch = next(source)
                except StopIteration:
                    raise LoaderError(f"rank {self.rank}: the data ran out at micro-batch {g}; this is a bug") from None
                pending[tuple(batch["stream"])] = batch
            batch = pending.pop(want)
            self._states[want[0]] = batch.pop("state")
            batch.pop("stream")
            self._skipped[want[0]] = batch.pop("skipped_samples")  # cumulative per stream this epoch
            self.skipped_samples = self._skipped_before + sum(self._skipped.values())
            self._count_mix(batch.pop("shards"), batch["durations"].tolist())
            self._consumed += 1
            yield batch
        self.epoch += 1
        self._skipped_before, self._skipped = self.skipped_samples, {}
        self._consumed, self._states, self._tag = 0, {}, ""
        self._quota_steps = self.steps_per_epoch

    def _count_mix(self, shards: list[int], seconds: list[float]) -> None:
        for shard, sec in zip(shards, seconds):
            seen = self.mix_seen[self._set_of_shard[shard]]
            seen[0] += 1
            seen[1] += sec

    def plan(self) -> Iterator[dict]:
        """The rest of the current epoch's micro-batches in delivery order, as ``keys`` and ``num_samples``
        (read from the shards' JSON; no audio is decoded), without moving the loader on: what this rank
        will train on, for planning and for bench/rank_balance.py."""
        layouts, states = self._layouts()
        ds = self._stream(layouts, states, decode=False)
        streams = [ds.iter_stream(w) for w in range(len(layouts))]
        for g in range(self._offset_consumed(), self._quota_steps * self.accumulation):
            batch = next(streams[g % len(streams)])  # the canonical order, as __iter__ delivers
            yield {"keys": batch["keys"], "num_samples": batch["num_samples"],
                   "sets": [self._set_of_shard[s] for s in batch["shards"]]}

    def _cut_padding(self) -> int | None:
        """The padding multiple when it decides where micro-batches are cut (the large-batch mode)."""
        return self.pad_to_multiple_of if self.micro_batch_seconds is not None else None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self._consumed,
            "world_size": self.world_size,
            "num_workers": max(1, self.num_workers),
            "micro_batch_size": self.micro_batch_size,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "micro_batch_seconds": self.micro_batch_seconds,
            "global_batch_seconds": self.global_batch_seconds,
            "accumulation": self.accumulation,
            "cut_padding": self._cut_padding(),
            "bucket_batches": self.bucket_batches,
            "sync_buckets": self.sync_buckets,
            "length_plan": self.length_plan,
            "mix": [list(m) for m in self.shards.mix],
            "num_samples": self.shards.num_samples,
            "quota_steps": self._quota_steps,
            "tag": self._tag,
            "streams": {str(k): v for k, v in self._states.items()},
            # train/skipped_samples stays whole across a resume
            "skipped_samples": self.skipped_samples,
            "skipped_before_epoch": self._skipped_before,
            "skipped_streams": {str(k): v for k, v in self._skipped.items()},
            "mix_seen": self.mix_seen,
            "augment_lengths": self._augment_lengths(),
        }

    def _augment_lengths(self) -> list:
        """What decides the utterances' lengths beyond the shards (augment.speed_*): part of the layout."""
        return self.augment.fingerprint() if self.augment is not None else []

    def load_state_dict(self, sd: dict) -> None:
        self.epoch = sd["epoch"]
        if len(sd.get("mix_seen", [])) == len(self.mix_seen):
            self.mix_seen = [[int(n), float(sec)] for n, sec in sd["mix_seen"]]
        self.skipped_samples = sd.get("skipped_samples", 0)
        self._skipped_before, self._skipped = self.skipped_samples, {}  # another layout: new streams count anew
        layout = ("world_size", "num_workers", "micro_batch_size", "seed", "global_batch_size", "num_samples",
                  "micro_batch_seconds", "global_batch_seconds", "cut_padding", "bucket_batches", "sync_buckets", "mix")
        mine = (self.world_size, max(1, self.num_workers), self.micro_batch_size, self.seed, self.global_batch_size,
                self.shards.num_samples, self.micro_batch_seconds, self.global_batch_seconds, self._cut_padding(),
                self.bucket_batches, self.sync_buckets, [list(m) for m in self.shards.mix])
        same = (tuple(sd.get(k) for k in layout) == mine and sd.get("length_plan", False) == self.length_plan
                and sd.get("augment_lengths", []) == self._augment_lengths())
        if same:
            self._consumed, self._quota_steps, self._tag = sd["consumed"], sd["quota_steps"], sd["tag"]
            self._states = {int(k): v for k, v in sd["streams"].items()}
            # the same streams go on: each reports its count for the whole epoch again
            self._skipped_before = sd.get("skipped_before_epoch", 0)
            self._skipped = {int(k): v for k, v in sd.get("skipped_streams", {}).items()}
            return
        if sd.get("augment_lengths", []) != self._augment_lengths():
            log.warning("augment.speed_prob or augment.speed_factors changed since the checkpoint: utterance lengths "
                        "differ, so the rest of the epoch is planned anew")
        # another layout: finish the epoch's remaining optimizer steps in a new deterministic order
        # consumed counts micro-batches of the saved layout since the epoch began; a partial step is redone
        saved_accumulation = sd.get("accumulation") or sd["global_batch_size"] // (sd["micro_batch_size"] * sd["world_size"])
        steps_done = min(self.steps_per_epoch, sd["consumed"] // saved_accumulation)
        log.warning(
            "resuming with world size %d x %d workers x micro batch %d (saved: %d x %d x %d): the rest of epoch %d "
            "(%d of %d steps) continues in a new deterministic order; utterances may repeat within this epoch",
            self.world_size, max(1, self.num_workers), self.micro_batch_size, sd["world_size"], sd["num_workers"],
            sd["micro_batch_size"], self.epoch, self.steps_per_epoch - steps_done, self.steps_per_epoch)
        self._quota_steps = self.steps_per_epoch - steps_done
        self._consumed = steps_done * self.accumulation
        self._tag = f"-resumed{steps_done}"
        self._states = {}


def unalignable(shards: ShardSet, alignable) -> list[tuple[str, int, int]]:
    """(key, model frames, frames needed) of every utterance of ``shards`` that ``alignable`` refuses, read
    from the shards' JSON (tar headers and JSON only; no audio is read)."""
    encode = LabelEncoder(shards.vocab)
    out = []
    for shard in shards.shards:
        for loc in list_samples(shard):
            try:
                meta = json.loads(loc.meta)
                frames, need = alignable(meta["num_samples"], encode(meta["text"]))
            except (KeyError, TypeError, ValueError):
                continue  # a damaged sample: the loader reports it (data.on_corrupt)
            if frames < need:
                out.append((loc.key, frames, need))
    return out
