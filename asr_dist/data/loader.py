"""Loaders over shard sets: the training stream and the evaluation stream.

Training, per rank (R ranks, W workers per rank, S streams = R x W):

  index.json shards ──(large-batch mode: split into units, a shard or a 1/k slice of one when shards < S)──>
  ──shuffled by (seed, epoch)──> one sequence of utterances; stream s reads exactly its quota of it (a fixed
      utterance count), or owns units of about equal audio (large-batch mode); then a reserve
  ──per stream: buffer of bucket_batches x micro utterances (compressed bytes + JSON)──>
  ──sort by length, cut into micro-batches, shuffle them (seed, epoch, worker, buffer; + rank unless synchronised)──>
  ──skip what the model cannot align (more CTC labels than its frames; ``alignable``, from the JSON), as damaged samples──>
  ──decode FLAC/WAV, featurise (the model family's: normalise, or fbank frames), encode labels, pad──>
      micro-batch (B, T) or (B, F, D) in the worker
  ──DataLoader (batch_size=None)──> reordered into the canonical order g -> (worker g % W, g // W)

Every rank yields exactly steps_per_epoch x accumulation micro-batches per epoch, where
steps_per_epoch = utterances in index.json // global batch: unequal counts hang NCCL collectives.
Synchronised buckets (the default with a fixed utterance count): every rank's buffer b of worker w
holds as many utterances, cut into as many micro-batches, shuffled in one order shared by the ranks,
so the ranks' j-th micro-batches are the same length quantile of their buffers and a step's ranks
do about the same work (each rank waits for the slowest; Lhotse's ``sync_buckets``). The last
buffer of an epoch holds only what the quota still takes.
In the large-batch mode (``micro_batch_seconds``) a buffer holds bucket_batches x that many seconds
of audio and is cut into micro-batches of as many utterances as fit (utterances x longest, padding
included), and steps_per_epoch = audio seconds in index.json // global batch seconds (padding makes
an epoch's steps hold a little less than all the audio; the rest comes in a later epoch's order).

Each micro-batch carries its stream's position after it (buffer start, buffer number, batches
taken from the buffer), so ``state_dict`` after any batch lets a new loader reproduce the rest of
the epoch exactly: it re-reads the buffer from its start (at most about one shard per worker),
redoes the same sort and shuffle, and skips what was already delivered.

Evaluation, per rank: all samples sorted by (length, key), cut into micro-batches, batch b to rank
b % R; ranks with fewer batches get filler batches whose ``valid`` mask is all False, so every rank
runs the same number of forward passes (ZeRO-3 gathers parameters collectively).

Batch keys: ``input_values`` (B, T) float32 (the model's input, whatever the family's keyword: the
waveform, or (B, F, D) feature frames), ``attention_mask`` (B, T) (or (B, F)) bool, ``labels`` (B, L)
int64 padded with -100, ``keys`` list[str], ``texts`` list[str], ``durations`` (B,) float32,
``valid`` (B,) bool (evaluation only).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import io
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import torch

from ..audio import SAMPLE_RATE, AudioError, decode
from ..errors import UserError
from ..text import PAD_TOKEN, UNK_TOKEN, WORD_DELIMITER, load_vocab
from . import index as fmt
from .worker_signals import BLOCKED_AT_START, OWNER_ENV, loader_worker_init

log = logging.getLogger(__name__)


class LoaderError(UserError):
    """A configuration or data problem that stops loading; the message says what to change."""


# ───────────────────────────── shard sets, labels, collation ─────────────────────────────


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int
    audio_seconds: float


@dataclasses.dataclass
class ShardSet:
    """One or more shard directories read as one set (they must share vocab and audio format)."""

    dirs: list[str]
    shards: list[ShardInfo]
    vocab: dict[str, int]
    audio_format: str
    text_normalizer: dict
    max_seconds: float | None = None  # every utterance is shorter (the index's duration histogram)
    mix: tuple = ()  # a weighted mix: (name, first shard, end shard, probability) per set; () reads all as one

    @property
    def mix_names(self) -> list[str]:
        return [m[0] for m in self.mix]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def audio_seconds(self) -> float:
        return sum(s.audio_seconds for s in self.shards)

    @classmethod
    def open(cls, dirs: str | os.PathLike | list | dict, temperature: float | None = None) -> "ShardSet":
        """One or more shard directories read as one, or a mix {name: {"path": DIR, "weight": W}} whose
        probabilities are the weights normalised, or hours ** ``temperature`` normalised when it is given."""
        if isinstance(dirs, dict):
            return cls._open_mix(dirs, temperature)
        dirs = [str(d) for d in ([dirs] if isinstance(dirs, (str, os.PathLike)) else dirs)]
        if not dirs:
            raise LoaderError("no shard directory given")
        shards, first, longest = [], None, []
        for d in dirs:
            index = fmt.read_index(d)
            hist = index.get("duration_histogram") or {}
            if hist.get("counts"):
                longest.append((max(int(b) for b in hist["counts"]) + 1) * hist["bin_seconds"])
            vocab = load_vocab(Path(d) / fmt.VOCAB_NAME)
            if first is None:
                first = (index, vocab)
            elif index["vocab_sha256"] != first[0]["vocab_sha256"] or index["audio_format"] != first[0]["audio_format"]:
                raise LoaderError(f"{d} has another vocab.json or audio format than {dirs[0]}; build them with the same --vocab")
            shards += [ShardInfo(str(Path(d) / s["name"]), s["num_samples"], s["audio_seconds"]) for s in index["shards"]]
        return cls(dirs, shards, first[1], first[0]["audio_format"], first[0]["text_normalizer"],
                   max(longest) if len(longest) == len(dirs) else None)

    @classmethod
    def _open_mix(cls, mix: dict, temperature: float | None) -> "ShardSet":
        if not mix:
            raise LoaderError("a mix that names no shard set: give {name: {path: DIR, weight: W}, …}")
        names, paths = list(mix), [mix[n]["path"] if isinstance(mix[n], dict) else mix[n] for n in mix]
        whole = cls.open(paths)
        sets, start = [], 0
        for name, path in zip(names, paths):
            shards = [s for s in whole.shards if Path(s.path).parent == Path(path)]
            hours = sum(s.audio_seconds for s in shards) / 3600
            weight = hours ** temperature if temperature is not None else float(mix[name]["weight"])
            if not weight > 0:
                raise LoaderError(f"data.train_shards.{name}: weight {weight:g}; give one above 0")
            sets.append([name, start, start + len(shards), weight])
            start += len(shards)
        if start != len(whole.shards):
            raise LoaderError(f"data.train_shards: the same shard directory in two sets of the mix ({', '.join(paths)})")
        total = sum(s[3] for s in sets)
        whole.mix = tuple((n, a, b, w / total) for n, a, b, w in sets)
        return whole


class LabelEncoder:
    """Transcript characters to CTC label ids (space -> "|", unknown -> [UNK]), as
    Wav2Vec2CTCTokenizer encodes them for this vocab."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.unk = vocab[UNK_TOKEN]
        self.pad = vocab[PAD_TOKEN]
        self.table = {c: i for c, i in vocab.items() if len(c) == 1}
        self.table[" "] = vocab[WORD_DELIMITER]

    def __call__(self, text: str) -> list[int]:
        return [self.table.get(c, self.unk) for c in text]


def sample_meta(raw: bytes | str) -> dict:
    """A sample's JSON as a dict with its num_samples; ValueError (the caller names the sample) otherwise."""
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError(f"its JSON is a {type(meta).__name__}, not an object")
    if not isinstance(meta.get("num_samples"), int) or not isinstance(meta.get("text"), str):
        raise ValueError("its JSON lacks a whole-number num_samples or a text string")
    return meta


def normalize(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, as Wav2Vec2FeatureExtractor(do_normalize=True)."""
    return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)


def decode_audio(data: bytes, where: str) -> np.ndarray:
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels = f.samplerate, f.channels
        audio, _ = decode(data)  # in blocks: a damaged header's frame count allocates nothing
    except (AudioError, sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise fmt.ShardError(f"{where}: audio does not decode ({e})") from None
    if sr != SAMPLE_RATE or channels != 1:
        raise fmt.ShardError(f"{where}: {sr} Hz, {channels}-channel audio; shards hold 16 kHz mono")
    return audio


def collate(samples: list[tuple[str, np.ndarray, list[int], str]], pad_to_multiple_of: int = 1,
            seconds: list[float] | None = None) -> dict:
    """(key, model input, label ids, text) per utterance -> a padded micro-batch. The model input is the
    featuriser's: normalised audio (T,) (``input_values`` (B, T)) or feature frames (F, D) (``input_values``
    (B, F, D)); ``attention_mask`` covers its time axis, which is padded to a multiple of
    ``pad_to_multiple_of`` of its own units. ``seconds``: each utterance's audio duration (default: T / 16 kHz,
    for 1-D input)."""
    n = len(samples)
    t_max = max(len(a) for _, a, _, _ in samples)
    t_max = -(-t_max // pad_to_multiple_of) * pad_to_multiple_of
    l_max = max(1, max(len(lab) for _, _, lab, _ in samples))
    input_values = torch.zeros(n, t_max, *samples[0][1].shape[1:], dtype=torch.float32)
    attention_mask = torch.zeros(n, t_max, dtype=torch.bool)  # 1 byte per sample crossing from the workers
    labels = torch.full((n, l_max), -100, dtype=torch.long)
    for i, (_, audio, lab, _) in enumerate(samples):
        input_values[i, : len(audio)] = torch.from_numpy(audio)
        attention_mask[i, : len(audio)] = True
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    if seconds is None:
        if input_values.dim() != 2:
            raise ValueError("collate of feature frames needs each utterance's seconds")
        seconds = [len(a) / SAMPLE_RATE for _, a, _, _ in samples]
    return {
        "input_values": input_values,
        "attention_mask": attention_mask,
        "labels": labels,
        "keys": [k for k, _, _, _ in samples],
        "texts": [t for _, _, _, t in samples],
        "durations": torch.tensor(seconds, dtype=torch.float32),
    }


def input_padding(featurize, pad_to_multiple_of: int) -> int:
    """data.pad_to_multiple_of (samples) in the featuriser's output units: frames where it makes frames
    (it says how many samples a frame spans in ``samples_per_frame``)."""
    return max(1, pad_to_multiple_of // getattr(featurize, "samples_per_frame", 1))


# ───────────────────────────── the training stream ─────────────────────────────


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


def _unit_samples(layout: StreamLayout, unit: tuple[int, int, int, int], skip: int, on_corrupt: str,
                  counters: dict) -> Iterator[tuple[str, dict]]:
    shard = layout.shards[unit[0]]
    first, stop, step = unit[1:]
    j = 0
    try:
        for n, (key, files) in enumerate(fmt.iter_shard(shard.path)):
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
        counters["skipped_samples"] = counters.get("skipped_samples", 0) + lost
        log.warning("skipping the rest of a damaged shard (%d samples of this stream): %s", lost, e)


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
                 featurize=normalize, alignable=None):
        self.layouts, self.states = layouts, states
        self.alignable = alignable  # (num_samples, label ids) -> (model frames, frames needed); None: no check
        self.vocab, self.audio_format = vocab, audio_format
        self.on_corrupt, self.pad_to_multiple_of = on_corrupt, pad_to_multiple_of
        self.decode = decode  # False: micro-batches of keys and lengths only, from the JSON (planning, benchmarks)
        self.featurize = featurize  # the model family's: audio (T,) -> its input (picklable: it goes to the workers)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        return self.iter_stream(w)

    def iter_stream(self, w: int) -> Iterator[dict]:
        layout, state = self.layouts[w], dataclasses.replace(self.states[w])
        encode = LabelEncoder(self.vocab)
        units = _units(layout)
        # after a restore the buffer is filled again (a damaged shard's loss is counted again: so it is left
        # out of the saved count), but its delivered batches are not decoded again (their skips are carried)
        counters: dict = {"skipped_samples": state.skipped_before_buffer}
        carried = state.skipped_in_buffer
        by_seconds = layout.micro_batch_seconds is not None
        # the buffer holds bucket_batches micro-batches: of micro_batch_size utterances, or of micro_batch_seconds
        full_buffer = layout.bucket_batches * (layout.micro_batch_seconds * SAMPLE_RATE if by_seconds
                                               else layout.micro_batch_size)
        pos, taken = state.cursor  # unit position, samples taken from that unit
        reader = None
        counters["refused_in_row"] = 0  # utterances the model cannot align since the last delivered batch
        while state.delivered < layout.num_batches:
            start = (pos, taken)
            buffer_size = full_buffer
            if not by_seconds:  # the epoch's last buffer holds only what the quota still takes: nothing read is left over
                left = layout.num_batches - (state.delivered - state.delivered_from_buffer)
                buffer_size = min(full_buffer, left * layout.micro_batch_size)
            before_buffer = counters["skipped_samples"]
            buffer: list[tuple[str, bytes, dict]] = []
            filled = 0  # utterances, or samples of audio in the large-batch mode
            while filled < buffer_size:
                if reader is None:  # opened once per unit; skipping only happens after a restore
                    reader = _unit_samples(layout, units[pos % len(units)], taken, self.on_corrupt, counters)
                item = next(reader, None)
                if item is None:
                    reader, pos, taken = None, pos + 1, 0
                    continue
                taken += 1
                key, files = item
                try:
                    sample = (key, files[self.audio_format], sample_meta(files["json"]), units[pos % len(units)][0])
                    filled += sample[2]["num_samples"] if by_seconds else 1
                    buffer.append(sample)
                except (KeyError, ValueError) as e:
                    self._bad(layout.shards[units[pos % len(units)][0]].path, key,
                              f"no .{self.audio_format} or unreadable JSON ({e})", counters)
            # similar lengths together: the padding of a micro-batch is what its longest utterance adds
            buffer.sort(key=lambda s: (s[2]["num_samples"], s[0]))
            if by_seconds:
                cuts = cut_by_seconds([m["num_samples"] for _, _, m, _ in buffer], layout.micro_batch_seconds,
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
            after_fill = counters["skipped_samples"]
            counters["skipped_samples"] += carried
            carried = 0
            for b in range(state.taken_from_buffer, len(batches)):
                if state.delivered == layout.num_batches:
                    break
                samples, shards, seconds = [], [], []
                for key, data, meta, shard in batches[b]:
                    self._add(layout, shard, key, data, meta, encode, counters, samples, shards, seconds)
                state.taken_from_buffer = b + 1
                if not samples:
                    continue  # every utterance of it was damaged and skipped: the next batch stands in
                batch = self._collate(samples, seconds)
                state.delivered += 1
                state.delivered_from_buffer += 1
                counters["refused_in_row"] = 0
                batch["shards"] = shards  # each utterance's shard (index into the layout's shards)
                batch["stream"] = (w, state.delivered - 1)
                batch["state"] = dataclasses.asdict(dataclasses.replace(
                    state, cursor=start, skipped_before_buffer=before_buffer,
                    skipped_in_buffer=counters["skipped_samples"] - after_fill))
                batch["skipped_samples"] = counters.get("skipped_samples", 0)
                yield batch
            state.buffer_index += 1
            state.taken_from_buffer = state.delivered_from_buffer = 0

    def _add(self, layout, shard: int, key, data: bytes, meta: dict, encode, counters, samples, shards,
             seconds) -> None:
        """Append one read sample to the micro-batch being formed (decoded and featurised, or its key and
        length when planning), or skip it: one the model cannot align, or whose audio does not decode."""
        path = layout.shards[shard].path
        if self.alignable is not None and not self._fits(path, layout, key, meta, encode, counters):
            return
        if not self.decode:
            samples.append((key, meta["num_samples"]))
            shards.append(shard)
            return
        try:
            audio = decode_audio(data, key)
        except fmt.ShardError as e:
            self._bad(path, key, str(e), counters)
            return
        samples.append((key, self.featurize(audio), encode(meta["text"]), meta["text"]))
        shards.append(shard)
        seconds.append(len(audio) / SAMPLE_RATE)

    def _collate(self, samples, seconds) -> dict:
        if self.decode:
            return collate(samples, input_padding(self.featurize, self.pad_to_multiple_of), seconds)
        return {"keys": [k for k, _ in samples], "num_samples": [n for _, n in samples]}

    def _fits(self, shard: str, layout, key, meta, encode, counters) -> bool:
        """Whether the model can align the sample; one it cannot is skipped like a damaged one (counted, logged),
        whatever data.on_corrupt says: its CTC loss would be infinite, zeroed by ctc_zero_infinity, and train nothing."""
        try:
            labels = encode(meta["text"])
            frames, need = self.alignable(meta["num_samples"], labels)
        except (KeyError, TypeError):
            return True  # no num_samples or text: the decode path reports the sample
        if frames >= need:
            return True
        counters["refused_in_row"] += 1
        if counters["refused_in_row"] > sum(s.num_samples for s in layout.shards):  # a whole pass, nothing delivered
            raise LoaderError(f"the model cannot align any utterance of the shards (e.g. {shard} sample {key}: "
                              f"{need} CTC frames needed, {frames} made): more labels than frames; the shard set does "
                              f"not fit this model's frame rate (`asr-dist train --dry-run` counts them)")
        counters["skipped_samples"] = counters.get("skipped_samples", 0) + 1
        log.warning("skipping %s sample %s: %d CTC labels need %d frames, the model makes %d of its %.2f s; "
                    "the model cannot align it (shards built for another model's frame rate?)", shard, key,
                    len(labels), need, frames, meta["num_samples"] / SAMPLE_RATE)
        return False

    def _bad(self, shard: str, key, why, counters):
        if self.on_corrupt == "stop":
            raise fmt.ShardError(f"{shard} sample {key}: {why} (data.on_corrupt=skip skips such samples)")
        counters["skipped_samples"] = counters.get("skipped_samples", 0) + 1
        log.warning("skipping %s sample %s: %s", shard, key, why)


def _worker_context():
    """The forkserver for loader workers. It preloads the module that makes it (and so every worker
    forked from it) ignore the preemption signals meant for the rank and die with the rank; it and
    multiprocessing's resource tracker are started with those signals blocked (a blocked signal stays
    blocked across exec, and a handled one would revert to its deadly default there)."""
    import multiprocessing
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    import signal

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "asr_dist.data.forkserver_preload"])
    os.environ[OWNER_ENV] = str(os.getpid())  # the forkserver's preload checks that its rank still lives
    # Python 3.11's forkserver ignores the sys.path it is handed: let it find asr_dist to preload it
    root = str(Path(__file__).resolve().parents[2])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, root]))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(BLOCKED_AT_START))
    try:
        multiprocessing.resource_tracker.ensure_running()  # it ignores TERM itself, and unblocks TERM here
        signal.pthread_sigmask(signal.SIG_BLOCK, set(BLOCKED_AT_START))
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return ctx


class TrainLoader:
    """Equal, length-bucketed micro-batches on every rank, with exact resume.

    ``rank`` and ``world_size`` are passed in (asr_dist.distributed reads the environment).
    Each iteration is one epoch and moves the loader on to the next (``set_epoch`` jumps to another).
    ``sync_buckets``: with a fixed utterance count, the micro-batches that the ranks run in the same
    step come from the same length quantile of their buffers, so no rank waits long for another."""

    def __init__(self, shards: ShardSet | str | list, *, rank: int, world_size: int, micro_batch_size: int,
                 global_batch_size: int = 32, num_workers: int = 2, seed: int = 0, bucket_batches: int | None = None,
                 on_corrupt: str = "stop", pin_memory: bool = False, pad_to_multiple_of: int = 1,
                 prefetch_factor: int = 4, micro_batch_seconds: float | None = None,
                 global_batch_seconds: float | None = None, sync_buckets: bool = True, featurize=normalize,
                 alignable=None, length_plan: bool = False):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet.open(shards)
        self.featurize = featurize  # audio (T,) -> the model's input, in the workers: the model family's featurizer()
        # alignable: the model's picklable check (asr_dist.audio.AlignmentCheck); utterances it refuses are skipped
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
            if longest is not None and longest > micro_batch_seconds:
                raise LoaderError(f"data.micro_batch_seconds={micro_batch_seconds:g}: {where} has utterances of up to "
                                  f"{longest:g} s (index.json's duration histogram), longer than a micro-batch; "
                                  f"raise it or rebuild the shards with --max-duration {micro_batch_seconds:g}")
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
        self.length_plan = length_plan
        self._catalogue = None  # length plan: every shard's samples, listed once (asr_dist.data.length_plan)
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

    def _stream(self, layouts: list[StreamLayout], states: list[StreamState], decode: bool) -> TrainStream:
        args = (layouts, states, self.shards.vocab, self.shards.audio_format, self.on_corrupt, self.pad_to_multiple_of)
        kwargs = dict(decode=decode, featurize=self.featurize, alignable=self.alignable)
        if not self.length_plan:
            return TrainStream(*args, **kwargs)
        from .length_plan import Catalogue, PlannedStream

        if self._catalogue is None:
            self._catalogue = Catalogue.list(self.shards, self.on_corrupt)
        return PlannedStream(self._catalogue, *args, **kwargs)

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
                                             multiprocessing_context=_worker_context(),
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
        }

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
        same = tuple(sd.get(k) for k in layout) == mine and sd.get("length_plan", False) == self.length_plan
        if same:
            self._consumed, self._quota_steps, self._tag = sd["consumed"], sd["quota_steps"], sd["tag"]
            self._states = {int(k): v for k, v in sd["streams"].items()}
            # the same streams go on: each reports its count for the whole epoch again
            self._skipped_before = sd.get("skipped_before_epoch", 0)
            self._skipped = {int(k): v for k, v in sd.get("skipped_streams", {}).items()}
            return
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
        for loc in fmt.list_shard(shard.path):
            try:
                meta = json.loads(loc.meta)
                frames, need = alignable(meta["num_samples"], encode(meta["text"]))
            except (KeyError, TypeError, ValueError):
                continue  # a damaged sample: the loader reports it (data.on_corrupt)
            if frames < need:
                out.append((loc.key, frames, need))
    return out


# ───────────────────────────── the evaluation stream ─────────────────────────────


class EvalBatches(torch.utils.data.Dataset):
    """Map-style: item i is this rank's i-th micro-batch (a filler when i is past its share)."""

    def __init__(self, batches: list[list[fmt.SampleLocation]], filler: list[fmt.SampleLocation], num_fillers: int,
                 vocab: dict[str, int], audio_format: str, featurize=normalize):
        self.batches, self.filler, self.num_fillers = batches, filler, num_fillers
        self.vocab, self.audio_format, self.featurize = vocab, audio_format, featurize
        self._fds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.batches) + self.num_fillers

    def __getitem__(self, i: int) -> dict:
        real = i < len(self.batches)
        locs = self.batches[i] if real else self.filler
        encode = LabelEncoder(self.vocab)
        samples, seconds = [], []
        for loc in locs:
            fd = self._fds.get(loc.shard)
            if fd is None:
                fd = self._fds[loc.shard] = os.open(loc.shard, os.O_RDONLY)
            text = json.loads(loc.meta)["text"]
            audio = decode_audio(loc.read(fd, self.audio_format), f"{loc.shard} sample {loc.key}")
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
        if micro_batch_seconds is not None and not micro_batch_seconds > 0:
            raise LoaderError(f"evaluation micro-batches of {micro_batch_seconds:g} seconds: give more than 0")
        self.rank, self.world_size, self.num_workers, self.pin_memory = rank, world_size, num_workers, pin_memory
        locs = [loc for s in self.shards.shards for loc in fmt.list_shard(s.path)]
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
                                   self.shards.vocab, self.shards.audio_format, featurize)

    def __len__(self) -> int:
        return self.num_batches_per_rank

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return (self.dataset[i] for i in range(len(self.dataset)))
        return iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, shuffle=False,
                                                num_workers=min(self.num_workers, max(1, len(self.dataset))),
                                                pin_memory=self.pin_memory, multiprocessing_context=_worker_context(),
                                                worker_init_fn=functools.partial(loader_worker_init, os.getpid())))
