"""The evaluation loader: every utterance of a shard set exactly once across ranks.

  every sample's length (tar headers and JSON; no audio) ──sorted by (length, key)──>
  ──cut into micro-batches (of micro_batch_size utterances, or of micro_batch_seconds, padding included)──>
  ──batch b to rank b % R──> fillers: ranks with fewer batches get batches whose ``valid`` mask is all False,
      so every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)
  ──read at their offsets, decoded, featurised, collated (asr_dist.data.samples)──> micro-batch + ``valid`` (B,) bool

B: utterances; the other keys and shapes as asr_dist.data.samples draws them.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Iterator

import torch

from ..audio import SAMPLE_RATE, normalize
from . import index as fmt
from . import remote
from .batching import cut_by_seconds
from .samples import LabelEncoder, collate, decode_audio, sample_meta
from .shardset import LoaderError, ShardInfo, ShardSet, list_samples
from .worker_signals import loader_worker_init, worker_context


class EvalBatches(torch.utils.data.Dataset):
    """Map-style: item i is this rank's i-th micro-batch (a filler when i is past its share)."""

    def __init__(self, batches: list[list[fmt.SampleLocation]], filler: list[fmt.SampleLocation], num_fillers: int,
                 vocab: dict[str, int], audio_format: str, featurize=normalize, shards: dict | None = None):
        self.batches, self.filler, self.num_fillers = batches, filler, num_fillers
        self.vocab, self.audio_format, self.featurize = vocab, audio_format, featurize
        self.shards = shards or {}  # each location's shard path -> its ShardInfo (how to read it)
        self._readers: dict[str, remote.LocalFile | remote.RangeFile] = {}

    def __len__(self) -> int:
        return len(self.batches) + self.num_fillers

    def __getitem__(self, i: int) -> dict:
        real = i < len(self.batches)
        locs = self.batches[i] if real else self.filler
        encode = LabelEncoder(self.vocab)
        samples, seconds = [], []
        for loc in locs:
            reader = self._readers.get(loc.shard)
            if reader is None:
                shard = self.shards.get(loc.shard) or ShardInfo(loc.shard, 0, 0.0)
                reader = self._readers[loc.shard] = remote.open_reader(shard)
            text = json.loads(loc.meta)["text"]
            audio = decode_audio(loc.read(reader, self.audio_format), f"{loc.shard} sample {loc.key}")
            samples.append((loc.key, self.featurize(audio), encode(text), text))
            seconds.append(len(audio) / SAMPLE_RATE)
        batch = collate(samples, seconds=seconds)
        batch["valid"] = torch.full((len(samples),), real, dtype=torch.bool)
        return batch


class EvalLoader:
    """Every evaluation utterance exactly once across ranks, sorted by length, keys carried along;
    micro-batches of ``micro_batch_size`` utterances or, given ``micro_batch_seconds``, of as many as
    fit in that many seconds of audio, padding included."""

    def __init__(self, shards: ShardSet | str | list, *, rank: int, world_size: int, micro_batch_size: int,
                 num_workers: int = 2, pin_memory: bool = False, micro_batch_seconds: float | None = None,
                 featurize=normalize):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet.open(shards)
        self.shards = self.shards.for_evaluation()
        if micro_batch_seconds is not None and not micro_batch_seconds > 0:
            raise LoaderError(f"evaluation micro-batches of {micro_batch_seconds:g} seconds: give more than 0")
        self.rank, self.world_size, self.num_workers, self.pin_memory = rank, world_size, num_workers, pin_memory
        locs = [loc for s in self.shards.shards for loc in list_samples(s)]
        if len(locs) != self.shards.num_samples:
            raise LoaderError(f"{self.shards.dirs}: {len(locs)} samples in the shards, index.json says "
                              f"{self.shards.num_samples}; run `asr-dist shards verify`")
        lengths = []
        for loc in locs:
            try:
                lengths.append(sample_meta(loc.meta)["num_samples"])
            except ValueError as e:
                raise LoaderError(f"{loc.shard}: sample {loc.key}: {e}; run `asr-dist shards verify` on it") from None
        order = sorted((n, loc.key, i) for i, (n, loc) in enumerate(zip(lengths, locs)))
        locs, lengths = [locs[i] for _, _, i in order], [n for n, _, _ in order]
        if micro_batch_seconds is None:
            batches = [locs[i:i + micro_batch_size] for i in range(0, len(locs), micro_batch_size)]
        else:  # as many as fit in that many seconds, padding included
            cuts = cut_by_seconds(lengths, micro_batch_seconds)
            batches = [locs[a:b] for a, b in cuts]
        self.num_batches_per_rank = -(-len(batches) // world_size)
        self.mine = batches[rank::world_size]
        self.num_utterances = sum(len(b) for b in self.mine)
        self.total_utterances = len(locs)
        self.dataset = EvalBatches(self.mine, locs[:1], self.num_batches_per_rank - len(self.mine),
                                   self.shards.vocab, self.shards.audio_format, featurize,
                                   {s.path: s for s in self.shards.shards})

    def __len__(self) -> int:
        return self.num_batches_per_rank

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return (self.dataset[i] for i in range(len(self.dataset)))
        return iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, shuffle=False,
                                                num_workers=min(self.num_workers, max(1, len(self.dataset))),
                                                pin_memory=self.pin_memory, multiprocessing_context=worker_context(),
                                                worker_init_fn=functools.partial(loader_worker_init, os.getpid())))
