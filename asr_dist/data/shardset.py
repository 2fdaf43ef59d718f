"""Shard sets opened for reading: the directories a run names, as one list of shards.

  DIR | [DIR, …] ──index.json + vocab.json (one vocab and audio format for all)──> ShardSet
      shards [ShardInfo(path, num_samples, audio_seconds)], vocab, audio format, longest utterance
  {name: {path: DIR, weight: W}} ──each set's probability (weights, or hours ** temperature, normalised)──>
      ShardSet with ``mix``: (name, first shard, end shard, probability) per set

``LoaderError`` is the data layer's user error: a setting or a shard set that loading cannot go on
with; its message says what to change.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..text import load_vocab, vocab_from_bytes
from . import index as fmt
from . import remote

log = logging.getLogger(__name__)


class LoaderError(UserError):
    """A configuration or data problem that stops loading; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str  # a local path, or a URL (asr_dist.data.remote)
    num_samples: int
    audio_seconds: float
    directory: str = ""  # the location of the set it belongs to, as given
    name: str = ""  # its file name in the set (shard-NNNNNN.tar)
    bytes: int = -1  # index.json's size and checksum of the file
    sha256: str = ""
    fetch: remote.Fetch | None = None  # how a shard at a URL is read; None: a local file


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

    @property
    def random_access(self) -> bool:
        """Whether every shard can be read at an offset (local, cached, or a store that serves byte ranges)."""
        return all(s.fetch is None or s.fetch.random_access for s in self.shards)

    def for_evaluation(self) -> "ShardSet":
        """This set as evaluation reads it: every shard is listed (tar headers and JSON) and read at offsets, so
        shards at URLs without data.cache_dir are fetched once, whole, into a temporary cache of this process
        (removed at exit) rather than listed over the network and read again by ranges."""
        if all(s.fetch is None or s.fetch.cache_dir is not None for s in self.shards):
            return self
        cached = self.cached(_temporary_cache())
        log.info("%s: no data.cache_dir; the shards are fetched once to %s (removed at exit)", ", ".join(self.dirs),
                 cached.shards[0].fetch.cache_dir if cached.shards[0].fetch else "")
        return cached

    def cached(self, cache_dir: str, cache_max_gb: float | None = None) -> "ShardSet":
        """This set with its shards at URLs read through the node-local cache at ``cache_dir``."""
        fetch = remote.Fetch(cache_dir, None if cache_max_gb is None else int(cache_max_gb * 1e9))
        shards = [s if s.fetch is None else dataclasses.replace(s, fetch=dataclasses.replace(fetch, ranges=s.fetch.ranges))
                  for s in self.shards]
        return dataclasses.replace(self, shards=shards)

    @classmethod
    def open(cls, dirs: str | os.PathLike | list | dict, temperature: float | None = None,
             cache_dir: str | None = None, cache_max_gb: float | None = None) -> "ShardSet":
        """One or more shard directories (or URLs: asr_dist.data.remote) read as one, or a mix
        {name: {"path": DIR, "weight": W}} whose probabilities are the weights normalised, or hours **
        ``temperature`` normalised when it is given. Shards at URLs are read through the node-local cache at
        ``cache_dir`` when it is given (at most ``cache_max_gb``), else by ranged reads or streamed."""
        if isinstance(dirs, dict):
            return cls._open_mix(dirs, temperature, cache_dir, cache_max_gb)
        dirs = [str(d) for d in ([dirs] if isinstance(dirs, (str, os.PathLike)) else dirs)]
        if not dirs:
            raise LoaderError("no shard directory given")
        shards, first, longest = [], None, []
        for d in dirs:
            index = fmt.read_index(d)
            hist = index.get("duration_histogram") or {}
            if hist.get("counts"):
                longest.append((max(int(b) for b in hist["counts"]) + 1) * hist["bin_seconds"])
            vocab = load_vocab_at(d)
            if first is None:
                first = (index, vocab)
            elif index["vocab_sha256"] != first[0]["vocab_sha256"] or index["audio_format"] != first[0]["audio_format"]:
                raise LoaderError(f"{d} has another vocab.json or audio format than {dirs[0]}; build them with the same --vocab")
            fetch = None
            if remote.is_url(d):
                ranges = remote.serves_ranges(d, fmt.INDEX_NAME)
                fetch = remote.Fetch(cache_dir, None if cache_max_gb is None else int(cache_max_gb * 1e9), ranges)
            shards += [ShardInfo(remote.join(d, s["name"]), s["num_samples"], s["audio_seconds"], d, s["name"],
                                 s.get("bytes", -1), s.get("sha256", ""), fetch) for s in index["shards"]]
        return cls(dirs, shards, first[1], first[0]["audio_format"], first[0]["text_normalizer"],
                   max(longest) if len(longest) == len(dirs) else None)

    @classmethod
    def _open_mix(cls, mix: dict, temperature: float | None, cache_dir: str | None = None,
                  cache_max_gb: float | None = None) -> "ShardSet":
        if not mix:
            raise LoaderError("a mix that names no shard set: give {name: {path: DIR, weight: W}, …}")
        names, paths = list(mix), [str(mix[n]["path"] if isinstance(mix[n], dict) else mix[n]) for n in mix]
        whole = cls.open(paths, cache_dir=cache_dir, cache_max_gb=cache_max_gb)
        sets, start = [], 0
        for name, path in zip(names, paths):
            shards = [s for s in whole.shards if s.directory == path]
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


@functools.lru_cache(maxsize=None)
def _temporary_cache() -> str:
    """A cache directory of this process for sets at URLs read without data.cache_dir; removed at exit."""
    path = tempfile.mkdtemp(prefix="asr-dist-shards-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def load_vocab_at(location: str) -> dict[str, int]:
    """vocab.json of the shard set at ``location`` (a directory or a URL)."""
    if not remote.is_url(location):
        return load_vocab(Path(remote.local_path(location)) / fmt.VOCAB_NAME)
    return vocab_from_bytes(remote.read_file(location, fmt.VOCAB_NAME), remote.join(location, fmt.VOCAB_NAME))


def list_samples(shard: ShardInfo) -> list[fmt.SampleLocation]:
    """Every sample of ``shard``, located (tar headers and JSON), read from its file, its cached copy, or
    fetched whole from its URL; each location names the shard as the set does (its path or URL)."""
    if shard.fetch is None:
        return fmt.list_shard(remote.local_path(shard.path))
    if shard.fetch.cache_dir is not None:
        return fmt.list_shard(shard.path, source=remote.cached_copy(shard))
    return fmt.list_shard(shard.path, remote.read_url(shard.path))
