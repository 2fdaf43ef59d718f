"""Shard sets opened for reading: the directories a run names, as one list of shards.

  DIR | [DIR, …] ──index.json + vocab.json (one vocab and audio format for all)──> ShardSet
      shards [ShardInfo(path, num_samples, audio_seconds)], vocab, audio format, longest utterance
  {name: {path: DIR, weight: W}} ──each set's probability (weights, or hours ** temperature, normalised)──>
      ShardSet with ``mix``: (name, first shard, end shard, probability) per set

``LoaderError`` is the data layer's user error: a setting or a shard set that loading cannot go on
with; its message says what to change.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import UserError
from ..text import load_vocab
from . import index as fmt


class LoaderError(UserError):
    """A configuration or data problem that stops loading; the message says what to change."""


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
