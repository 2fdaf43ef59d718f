"""The on-disk shard-set format (version 1, specified in shards/FORMAT.md): names, index.json,
and a safe reader for our tar shards.

  DIR/shard-000000.tar … shard-NNNNNN.tar   {key}.flac|{key}.wav + {key}.json per sample
  DIR/index.json                            written last: its presence means the set is complete
  DIR/vocab.json  DIR/rejects.tsv  DIR/samples.tsv (each sample's length and byte offsets)
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from ..errors import InvalidValue, PathNotFound, UserError
from . import remote

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
VOCAB_NAME = "vocab.json"
REJECTS_NAME = "rejects.tsv"
SAMPLES_NAME = "samples.tsv"
SAMPLES_HEADER = "shard\tkey\tnum_samples\taudio_offset\taudio_size\tjson_offset\tjson_size\n"
STATE_NAME = ".build-state.json"
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
AUDIO_EXTS = ("flac", "wav")
KEY_RE = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9_-]*$")
MAX_MEMBER_BYTES = 1 << 30  # one sample's file; anything larger is not an utterance
HIST_BIN_SECONDS = 1.0
REJECTS_HEADER = "input\titem\treason\tdetail\n"


class ShardError(UserError):
    """A shard that cannot be read; the message names the shard and the last good sample."""


def tar_member_bytes(key: str, files: dict[str, bytes]) -> bytes:
    """One sample as the tar blocks that tarfile would write: a header (fixed mtime, owner and mode,
    so the same sample always gives the same bytes) and the data padded to 512 bytes, per file.
    Shards are concatenations of these plus ``tar_end``; workers can encode samples in parallel."""
    parts = []
    for ext in sorted(files):
        data = files[ext]
        ti = tarfile.TarInfo(f"{key}.{ext}")
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o444, "asr-dist", "asr-dist"
        parts.append(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        parts.append(data)
        if len(data) % tarfile.BLOCKSIZE:
            parts.append(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
    return b"".join(parts)


def tar_end(size: int) -> bytes:
    """The end-of-archive marker after ``size`` bytes of members: two zero blocks, then zeros up
    to a whole record, as tarfile writes it."""
    size += 2 * tarfile.BLOCKSIZE
    return tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-size) % tarfile.RECORDSIZE)


def histogram_add(hist: dict[str, int], duration: float) -> None:
    """Count a duration into 1-second bins, keyed by the bin's lower edge ("0", "1", …)."""
    b = str(int(math.floor(duration / HIST_BIN_SECONDS)))
    hist[b] = hist.get(b, 0) + 1


def histogram_merge(hists) -> dict[str, int]:
    total: Counter = Counter()
    for h in hists:
        total.update(h)
    return {k: total[k] for k in sorted(total, key=int)}


def field_value_key(value) -> str:
    """How a metadata value is counted in index.json: strings as they are, other JSON values as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def fields_summary(per_shard) -> dict:
    """index.json's ``fields``: for each metadata field, the samples that have it and the count of each value."""
    total: dict[str, Counter] = {}
    for fields in per_shard:
        for name, counts in fields.items():
            total.setdefault(name, Counter()).update(counts)
    return {
        name: {"num_samples": sum(c.values()), "num_values": len(c), "counts": dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))}
        for name, c in sorted(total.items())
    }


def iter_shard(path: str | os.PathLike, data: bytes | None = None, fileobj=None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for each sample of a shard (read from ``data`` when the
    caller already holds its bytes, or from the file object ``fileobj``: a stream from a URL), refusing
    anything but plain files with safe relative names (no "..", no absolute paths, no links or devices).
    ``path`` names the shard in errors."""
    last = "(start of shard)"
    if data is not None:
        fileobj = io.BytesIO(data)
    try:
        opened = tarfile.open(path, mode="r|") if fileobj is None else tarfile.open(fileobj=fileobj, mode="r|")
        with opened as tar:
            key, files = None, {}
            for m in tar:
                name = m.name
                k, ext = _check_member(path, m)
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise ShardError(f"{path}: member {name!r} is truncated")
                if k != key:
                    if key is not None:
                        yield key, files
                        last = key
                    key, files = k, {}
                files[ext] = data
            if key is not None:
                yield key, files
    except UserError:
        raise  # a URL that cannot be read (asr_dist.data.remote) stops: it is no damage to skip
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{path}: unreadable after sample {last}: {e}") from None


def _check_member(path: Path, m: tarfile.TarInfo) -> tuple[str, str]:
    name = m.name
    if not m.isreg():
        raise ShardError(f"{path}: member {name!r} is not a regular file (links and devices are refused)")
    if name.startswith("/") or ".." in name.split("/") or "/" in name:
        raise ShardError(f"{path}: member {name!r} has an unsafe or nested path")
    if m.size > MAX_MEMBER_BYTES:
        raise ShardError(f"{path}: member {name!r} is {m.size} bytes, over the {MAX_MEMBER_BYTES} limit")
    key, dot, ext = name.partition(".")
    if not dot:
        raise ShardError(f"{path}: member {name!r} has no extension")
    return key, ext


@dataclasses.dataclass
class SampleLocation:
    """Where one sample lies in a shard: ``start``/``end`` bound its tar blocks (headers and padded
    data of all its files, ready to copy into another shard); ``members`` maps an extension to the
    (offset, size) of that file's bytes."""

    key: str
    shard: str
    start: int
    end: int
    members: dict[str, tuple[int, int]]
    meta: bytes = b""  # the JSON member's bytes

    def read(self, reader, ext: str) -> bytes:
        """The bytes of its ``ext`` file, from ``reader`` (asr_dist.data.remote.open_reader of its shard)."""
        offset, size = self.members[ext]
        data = reader.pread(size, offset)
        if len(data) != size:
            raise ShardError(f"{self.shard}: sample {self.key} is cut short ({len(data)} of {size} bytes of .{ext})")
        return data


def list_shard(path: str | os.PathLike, data: bytes | None = None, source: str | None = None) -> list[SampleLocation]:
    """Every sample of a shard, located without reading its audio (tar headers and JSON only); from
    ``data``, the shard's bytes, where the caller holds them already, or from the local file ``source``
    (a cached copy) with ``path`` naming the shard."""
    out: list[SampleLocation] = []
    try:
        with (tarfile.open(source or path, mode="r:") if data is None
              else tarfile.open(fileobj=io.BytesIO(data), mode="r:")) as tar:
            for m in tar:
                key, ext = _check_member(path, m)
                end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if out and out[-1].key == key:
                    out[-1].end = end
                else:
                    out.append(SampleLocation(key, str(path), m.offset, end, {}))
                out[-1].members[ext] = (m.offset_data, m.size)
                if ext == "json":
                    out[-1].meta = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{path}: unreadable: {e}") from None
    return out


def sample_table_bytes(directory: str | os.PathLike, shards: list[dict], audio_format: str) -> bytes:
    """samples.tsv of a set: per sample, in shard order, its shard, key, length and the (offset, size) of its
    audio and JSON bytes, so that readers plan an epoch by length without listing every shard."""
    lines = [SAMPLES_HEADER]
    for s in shards:
        lines += sample_table_lines(s["name"], list_shard(Path(directory) / s["name"]), audio_format)
    return "".join(lines).encode("utf-8")


def sample_table_lines(name: str, locs: list[SampleLocation], audio_format: str) -> list[str]:
    """samples.tsv's lines for the samples ``locs`` of the shard ``name``."""
    lines = []
    for loc in locs:
        (a_at, a_size), (j_at, j_size) = loc.members[audio_format], loc.members["json"]
        n = json.loads(loc.meta)["num_samples"]
        lines.append(f"{name}\t{loc.key}\t{n}\t{a_at}\t{a_size}\t{j_at}\t{j_size}\n")
    return lines


def read_sample_table(directory: str | os.PathLike, index: dict) -> dict[str, tuple[list[str], list[tuple]]]:
    """samples.tsv as {shard name: (keys, [(num_samples, audio offset, audio size, JSON offset, JSON size)])},
    holding only the shards it can speak for: none where the set has no table (built by an older asr-dist)
    or the table is not the one index.json records, and no local shard whose file size is not index.json's.
    ``directory``: a directory or a URL (asr_dist.data.remote)."""
    entry = index.get("samples_table")
    if not entry:
        return {}
    try:
        data = remote.read_file(directory, SAMPLES_NAME)
    except (OSError, remote.RemoteError, PathNotFound) as e:
        logging.getLogger(__name__).warning("%s: %s unreadable (%s); its shards are listed instead (each read "
                                            "whole where the set is at a URL)", directory, SAMPLES_NAME, e)
        data = b""
    if len(data) != entry.get("bytes"):
        return {}
    out: dict[str, tuple[list[str], list[tuple]]] = {}
    try:
        for line in data.decode("utf-8").splitlines()[1:]:
            shard, key, *numbers = line.split("\t")
            keys, rows = out.setdefault(shard, ([], []))
            keys.append(key)
            rows.append(tuple(int(x) for x in numbers))
    except ValueError:  # not ours after all: the shards are listed instead
        return {}
    for s in index["shards"]:
        try:  # a shard at a URL is checked when it is read (its size by the ranged reads, the cache's checksum)
            ok = remote.is_url(directory) or os.stat(Path(remote.local_path(directory)) / s["name"]).st_size == s["bytes"]
        except OSError:
            ok = False
        if not ok or len(out.get(s["name"], ((), ()))[1]) != s["num_samples"]:
            out.pop(s["name"], None)
    return out


def read_index(directory: str | os.PathLike) -> dict:
    """index.json of a complete shard set (a directory or a URL), with a clear error when it is missing or foreign."""
    if remote.is_url(directory):
        p = remote.join(str(directory), INDEX_NAME)
        try:
            data = remote.read_url(p)
        except PathNotFound:
            raise PathNotFound(f"{p}: not found; {directory} is not a complete shard set (index.json is written "
                               f"last: an upload that stopped has none), or the URL is wrong") from None
    else:
        d = Path(remote.local_path(directory))
        p = d / INDEX_NAME
        if not d.is_dir():
            raise PathNotFound(f"{d}: no such shard directory")
        if not p.exists():
            hint = " (a build was interrupted here: re-run it with the same arguments to finish)" if (d / STATE_NAME).exists() else ""
            raise PathNotFound(f"{d}: no {INDEX_NAME}; not a complete shard set{hint}")
        data = p.read_bytes()
    try:
        index = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors; RecursionError: absurdly deep nesting
        raise InvalidValue(f"{p}: not valid JSON ({str(e)[:200] or type(e).__name__}); rebuild the shard set") from None
    version = index.get("format_version") if isinstance(index, dict) else None
    if version != FORMAT_VERSION:
        raise InvalidValue(f"{p}: format version {version!r}, this asr-dist reads version {FORMAT_VERSION}")
    problem = _index_problem(index)
    if problem:
        raise InvalidValue(f"{p}: {problem}; rebuild the shard set (asr-dist shards build)")
    return index


def _index_problem(index: dict) -> str | None:
    """What is wrong with the fields readers rely on, or None (the fields of FORMAT.md)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    for key, ok in (("num_samples", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                    ("audio_seconds", number), ("audio_format", lambda v: v in AUDIO_EXTS),
                    ("vocab_sha256", lambda v: isinstance(v, str)), ("shards", lambda v: isinstance(v, list)),
                    ("text_normalizer", lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)
                     and isinstance(v.get("settings", {}), dict)),
                    ("characters", lambda v: isinstance(v, dict)),
                    ("build_failed", lambda v: v is None or (isinstance(v, dict) and number(v.get("reject_fraction"))
                                                             and number(v.get("max_reject_fraction"))))):
        if key == "build_failed" and key not in index:
            continue  # sets built before the field existed
        if key not in index or not ok(index[key]):
            return f"field {key!r} is missing or malformed ({str(index.get(key))[:80]})"
    for i, shard in enumerate(index["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str) and SHARD_RE.match(shard["name"])
                and isinstance(shard.get("num_samples"), int) and not isinstance(shard["num_samples"], bool)
                and shard["num_samples"] >= 0 and number(shard.get("audio_seconds"))):
            return f"shard entry {i} is malformed (a shard-NNNNNN.tar name, num_samples, audio_seconds): {str(shard)[:120]}"
    hist = index.get("duration_histogram")
    if not (isinstance(hist, dict) and number(hist.get("bin_seconds")) and hist["bin_seconds"] > 0
            and isinstance(hist.get("counts"), dict)
            and all(isinstance(k, str) and k.lstrip("-").isdigit() and isinstance(v, int) for k, v in hist["counts"].items())):
        return f"field 'duration_histogram' is missing or malformed ({str(hist)[:80]})"
    return None


def build_failure(index: dict) -> str | None:
    """Why the build of this set failed (more rejected than its --max-reject-fraction), or None."""
    failed = index.get("build_failed")
    if not failed:
        return None
    return (f"its build failed: {100 * failed['reject_fraction']:.1f} % of the items were rejected, over "
            f"--max-reject-fraction {failed['max_reject_fraction']} (see {REJECTS_NAME})")


def failure_mark(reject_fraction: float, max_reject_fraction: float) -> dict | None:
    """index.json's ``build_failed``: set when more than ``max_reject_fraction`` was rejected."""
    if reject_fraction <= max_reject_fraction:
        return None
    return {"reject_fraction": round(reject_fraction, 6), "max_reject_fraction": max_reject_fraction}


def write_json_atomic(path: Path, obj, **kwargs) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, **kwargs)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
