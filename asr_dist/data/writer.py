"""The shard builder: corpora in, a verified-format shard set out.

  inputs ──scan (manifests only)──> items ──normalise text, drop duplicates, take --part──>
  ──order by sha256(seed, key)──> [worker pool: read → decode → downmix → soxr 16 kHz → filters → FLAC]
  ──in order──> ShardSetWriter: equal-count shards, written to *.tmp and renamed, progress in
  .build-state.json after every shard ──> vocab.json, rejects.tsv, index.json (last)

The global shuffle is a sort by a seeded hash of each sample key. It does not depend on which other
samples exist, so building parts of a corpus (``--part I/N``) and merging them gives the same
shards, byte for byte, as one build of the whole corpus.

Restart: an interrupted build re-run with the same arguments checks the finished shards' checksums,
keeps them, and continues from the first input item not yet in a finished shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from .. import __version__
from ..audio import SAMPLE_RATE, AudioError, decode, encode, probe, to_16k
from ..errors import UserError
from ..text import (
    Normalizer,
    TextReject,
    build_vocab,
    load_vocab,
    vocab_chars,
    vocab_hash,
    vocab_json_bytes,
)
from . import index as fmt
from . import remote
from .hub import Spill
from .items import RESERVED_FIELDS, InputError, Item, Reject
from .sources import item_audio, read_input, resolve_input, table_fields

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildOptions:
    """Everything `asr-dist shards build` takes; see its --help for each option."""

    inputs: list[str]
    output: str
    input_format: str | None = None
    text_column: str | None = None
    audio_column: str | None = None
    subset: str | None = None  # of a Hugging Face dataset repository or cache
    split: str | None = None  # of a Hugging Face dataset or a Common Voice release
    keep_fields: list[str] | None = None  # metadata carried into each sample's JSON; None: the layout's defaults
    audio_format: str = "flac"
    normalizer: str = "danish"
    normalizer_settings: dict = dataclasses.field(default_factory=dict)
    vocab: str | None = None
    min_duration: float = 0.5
    max_duration: float = 30.0
    shard_size: int = 1000
    seed: int = 0
    sort_in_shard: bool = False
    workers: int = 1
    part: tuple[int, int] | None = None  # (I, N), 0 <= I < N
    max_reject_fraction: float = 0.05
    allow_commands: bool = False  # run Kaldi wav.scp commands ("… |") through the shell
    overwrite: bool = False
    dry_run: bool = False
    progress: bool = True

    def __post_init__(self):
        self.inputs = [str(p) for p in self.inputs]
        self.output = str(self.output)
        if not self.inputs:
            raise InputError("give at least one --input")
        if self.audio_format not in ("flac", "wav"):
            raise InputError(f"--audio-format {self.audio_format!r}: choose flac or wav")
        if self.shard_size < 1:
            raise InputError("--shard-size must be at least 1")
        if not 0 <= self.min_duration < self.max_duration:
            raise InputError(f"need 0 <= --min-duration < --max-duration (got {self.min_duration}, {self.max_duration})")
        if self.workers < 1:
            raise InputError("--workers must be at least 1")
        if self.part is not None:
            i, n = self.part
            if not (n >= 1 and 0 <= i < n):
                raise InputError(f"--part {i}/{n}: I must be in 0..N-1")
        if not 0 <= self.max_reject_fraction <= 1:
            raise InputError("--max-reject-fraction must be between 0 and 1")
        if self.keep_fields is not None:
            self.keep_fields = list(dict.fromkeys(f.strip() for f in self.keep_fields if f.strip()))
            reserved = sorted(set(self.keep_fields) & RESERVED_FIELDS)
            if reserved:
                raise InputError(f"--keep-fields {','.join(reserved)}: the sample JSON already has "
                                 f"{'this field' if len(reserved) == 1 else 'these fields'}; choose other names")


@dataclasses.dataclass
class BuildSummary:
    output: str
    num_items: int = 0
    num_kept: int = 0
    num_shards: int = 0
    audio_seconds: float = 0.0
    rejects: Counter = dataclasses.field(default_factory=Counter)
    elapsed: float = 0.0
    processed_seconds: float = 0.0  # audio built in this run (not counting shards kept from before)
    max_reject_fraction: float = 0.05
    already_complete: bool = False
    dry_run: bool = False

    @property
    def num_rejected(self) -> int:
        return sum(self.rejects.values())

    @property
    def reject_fraction(self) -> float:
        total = self.num_kept + self.num_rejected
        return self.num_rejected / total if total else 0.0

    @property
    def failed(self) -> bool:
        return self.reject_fraction > self.max_reject_fraction

    def render(self) -> str:
        verb = "would keep" if self.dry_run else "kept"
        lines = [
            f"{self.output}: {verb} {self.num_kept} utterances ({self.audio_seconds / 3600:.2f} h)"
            + ("" if self.dry_run else f" in {self.num_shards} shards"),
            f"rejected {self.num_rejected} ({100 * self.reject_fraction:.1f} %)"
            + (f", listed in {remote.join(self.output, fmt.REJECTS_NAME)}" if self.num_rejected and not self.dry_run else ""),
        ]
        for reason, n in self.rejects.most_common():
            lines.append(f"  {reason:<22} {n}")
        if self.already_complete:
            lines.append("the shard set was already complete with these arguments; nothing rebuilt")
        elif self.elapsed > 0 and not self.dry_run:
            lines.append(
                f"built {self.processed_seconds / 3600:.2f} h of audio in {self.elapsed:.1f} s "
                f"({self.processed_seconds / self.elapsed:.0f}x real time)"
            )
        if self.failed:
            lines.append(
                f"FAILED: {100 * self.reject_fraction:.1f} % rejected is over --max-reject-fraction "
                f"{self.max_reject_fraction}; read {fmt.REJECTS_NAME}, fix the inputs or raise the limit"
            )
        return "\n".join(lines)


# ───────────────────────────── scanning ─────────────────────────────


def order_key(seed: int, key: str) -> bytes:
    """The global shuffle: samples are written in the order of this seeded hash of their key."""
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def _in_part(name: str, part: tuple[int, int] | None) -> bool:
    if part is None:
        return True
    i, n = part
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % n == i


def check_keep_fields(keep: list[str], offered: dict[str, set]) -> None:
    """--keep-fields names only fields that some input (``offered``: its label -> its fields) has."""
    everywhere = set().union(*offered.values())
    missing = [f for f in keep if f not in everywhere]
    if missing:
        have = "; ".join(f"{label}: {', '.join(sorted(c)) or '(none)'}" for label, c in offered.items())
        raise InputError(f"--keep-fields {','.join(missing)}: no input has {'this field' if len(missing) == 1 else 'these fields'}; "
                         f"fields found: {have}")


def scan(opts: BuildOptions, specs, normalizer: Normalizer, vocab: dict | None,
         spill: Spill | None = None) -> tuple[list[Item], list[Reject]]:
    """All items of all inputs, text normalised, duplicates and text rejects removed, in shuffle order.

    Audio held in parquet/arrow tables is copied to ``spill`` on the way (a row group at a time)."""
    allowed = vocab_chars(vocab) if vocab else None
    items: list[Item] = []
    rejects: list[Reject] = []
    seen: dict[str, Item] = {}
    offered: dict[str, set] = {}
    for spec in specs:
        columns = offered.setdefault(spec.label, set())
        for it in read_input(spec, opts.text_column, opts.audio_column, keep=opts.keep_fields, spill=spill,
                             columns_seen=columns, allow_commands=opts.allow_commands):
            if isinstance(it, Reject):
                if _in_part(f"{it.input}\0{it.item}", opts.part):
                    rejects.append(it)
                continue
            if not _in_part(it.key, opts.part):
                continue
            first = seen.get(it.key)
            if first is not None:
                rejects.append(Reject(it.input, it.item, "duplicate_key", f"key {it.key} already used by {first.input} {first.item}"))
                continue
            seen[it.key] = it
            try:
                it.text = normalizer(it.text_raw)
            except TextReject as e:
                rejects.append(Reject(it.input, it.item, e.reason, e.detail))
                continue
            if allowed is not None:
                oov = sorted(set(it.text) - allowed)
                if oov:
                    rejects.append(Reject(it.input, it.item, "oov_chars", "characters not in --vocab: " + "".join(oov)))
                    continue
            items.append(it)
    if opts.keep_fields is not None:
        check_keep_fields(opts.keep_fields, offered)
    items.sort(key=lambda it: order_key(opts.seed, it.key))
    return items, rejects


# ───────────────────────────── pass 1: check every item (pool workers) ─────────────────────────────

_WORK: dict = {}


def _init_worker(work: dict) -> None:
    _WORK.clear()
    _WORK.update(work)


def check_item(item: Item):
    """("ok", seconds, None) or ("reject", reason, detail): read and decode, apply the filters."""
    w = _WORK
    try:
        frames, sr = probe(item_audio(item), item.offset, item.duration)
    except AudioError as e:
        return "reject", e.reason, e.detail
    except Exception as e:  # an exotic file or a bug: reject it with the cause rather than lose the build
        return "reject", "error", f"{type(e).__name__}: {e}"
    seconds = frames / sr
    if seconds < w["min_duration"]:
        return "reject", "too_short", f"{seconds:.2f} s < --min-duration {w['min_duration']}"
    if seconds > w["max_duration"]:
        return "reject", "too_long", f"{seconds:.2f} s > --max-duration {w['max_duration']}"
    return "ok", seconds, None


def _map(fn, tasks: list, work: dict, workers: int, ordered: bool = True, chunksize: int = 16) -> Iterator:
    """fn over tasks in ``workers`` processes (inline when 1); in order unless ``ordered`` is False."""
    if workers == 1 or len(tasks) < 2:
        _init_worker(work)
        yield from map(fn, tasks)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(work,)) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, tasks, chunksize=chunksize)


# ───────────────────────────── pass 2: each worker writes whole shards ─────────────────────────────


class BuildError(UserError):
    """The build cannot go on; the message says why and what to do."""


@dataclasses.dataclass
class TarSlice:
    """A sample already encoded in another shard (merging): its tar blocks and its JSON."""

    key: str
    path: str
    start: int
    end: int
    meta: dict


@dataclasses.dataclass
class ShardTask:
    out: str
    name: str
    sources: list  # Items to process (build) or TarSlices to copy (merge), in shard order
    audio_format: str
    sort_in_shard: bool


def _encode_item(item: Item, audio_format: str) -> tuple[str, bytes, dict]:
    try:
        audio, sr = decode(item_audio(item), item.offset, item.duration)
    except AudioError as e:
        raise BuildError(
            f"{item.input} {item.item}: read fine in the first pass but not now ({e}); did the input change "
            f"during the build? Re-run the same command to continue"
        ) from None
    audio = to_16k(audio, sr)
    data = encode(audio, audio_format)
    meta = {
        "text": item.text,
        "text_raw": item.text_raw,
        "duration": round(len(audio) / SAMPLE_RATE, 6),
        "num_samples": len(audio),
        "source": item.input,
        "id": item.item,
        "audio_sha256": hashlib.sha256(data).hexdigest(),
    }
    meta.update(item.metadata())
    return item.key, fmt.tar_member_bytes(item.key, {audio_format: data, "json": _meta_bytes(meta)}), meta


def _samples(task: ShardTask) -> Iterator[tuple[str, bytes, dict]]:
    handles: dict[str, int] = {}
    try:
        for src in task.sources:
            if isinstance(src, TarSlice):
                fd = handles.get(src.path)
                if fd is None:
                    fd = handles[src.path] = os.open(src.path, os.O_RDONLY)
                yield src.key, os.pread(fd, src.end - src.start, src.start), src.meta
            else:
                yield _encode_item(src, task.audio_format)
    finally:
        for fd in handles.values():
            os.close(fd)


def write_shard(task: ShardTask) -> dict:
    """Write one shard under a temporary name, fsync, rename; return its index entry."""
    samples: Iterable = _samples(task)
    if task.sort_in_shard:
        samples = sorted(samples, key=lambda s: (s[2]["num_samples"], s[0]))
    path = Path(task.out) / task.name
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    hist: dict[str, int] = {}
    chars: Counter = Counter()
    fields: dict[str, Counter] = {}
    seconds, size, count = 0.0, 0, 0
    with open(tmp, "wb") as f:
        for _, blob, meta in samples:
            f.write(blob)
            digest.update(blob)
            size += len(blob)
            count += 1
            seconds += meta["duration"]
            fmt.histogram_add(hist, meta["duration"])
            chars.update(meta["text"])
            for k, v in meta.items():
                if k not in RESERVED_FIELDS:
                    fields.setdefault(k, Counter())[fmt.field_value_key(v)] += 1
        end = fmt.tar_end(size)
        f.write(end)
        digest.update(end)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {
        "name": task.name,
        "num_samples": count,
        "audio_seconds": round(seconds, 3),
        "bytes": size + len(end),
        "sha256": digest.hexdigest(),
        "histogram": hist,
        "characters": dict(sorted(chars.items())),
        "fields": {k: dict(sorted(c.items())) for k, c in sorted(fields.items())},
    }


def _meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _our_files(out: Path) -> list[Path]:
    names = (fmt.INDEX_NAME, fmt.VOCAB_NAME, fmt.REJECTS_NAME, fmt.SAMPLES_NAME, fmt.STATE_NAME)
    return [p for p in out.iterdir() if fmt.SHARD_RE.match(p.name) or p.name in names or p.name.endswith(".tmp")]


def _prepare_output(out: Path, fingerprint: dict, overwrite: bool) -> tuple[dict | None, dict]:
    """(the existing index when this exact set is already complete, finished shards to keep)."""
    index_path = out / fmt.INDEX_NAME
    state_path = out / fmt.STATE_NAME
    if index_path.exists() and not overwrite:
        existing = json.loads(index_path.read_text(encoding="utf-8"))
        if existing.get("fingerprint") == fingerprint:
            return existing, {}
    ours = _our_files(out) if out.exists() else []
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
    same_run = state.get("fingerprint") == fingerprint and not index_path.exists()
    if ours and overwrite:
        log.warning("--overwrite: removing the shard set in %s", out)
        for p in ours:
            p.unlink()
        state = {}
    elif ours and not same_run:
        what = "a different shard set" if index_path.exists() else "shards from another, unfinished build"
        raise InputError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob("*.tmp"):
        p.unlink()  # a write cut off by the interruption
    finished = {}
    for name, entry in (state.get("shards") or {}).items():
        p = out / name
        if p.exists() and p.stat().st_size == entry["bytes"] and _sha256_file(p) == entry["sha256"]:
            finished[name] = entry
        else:
            log.warning("%s is missing or damaged; writing it again", p)
    if finished:
        log.info("resuming: %d finished shards kept", len(finished))
    return None, finished


def _write_shards(out: Path, tasks: list[ShardTask], finished: dict, fingerprint: dict, workers: int,
                  progress: bool, desc: str) -> list[dict]:
    """Write the shards not finished yet, recording each in the progress file as it lands."""
    todo = [t for t in tasks if t.name not in finished]
    total = sum(len(t.sources) for t in tasks)
    done = dict(finished)
    with tqdm(desc=desc, total=total, initial=total - sum(len(t.sources) for t in todo), unit="utt",
              disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar:
        for entry in _map(write_shard, todo, {}, workers, ordered=False, chunksize=1):
            done[entry["name"]] = entry
            fmt.write_json_atomic(out / fmt.STATE_NAME, {"fingerprint": fingerprint, "shards": done})
            bar.update(entry["num_samples"])
    return [done[t.name] for t in tasks]


def _plan(out: Path, sources: list, shard_size: int, audio_format: str, sort_in_shard: bool) -> list[ShardTask]:
    return [
        ShardTask(str(out), fmt.SHARD_PATTERN.format(i // shard_size), sources[i:i + shard_size], audio_format, sort_in_shard)
        for i in range(0, len(sources), shard_size)
    ]


def _fingerprint(opts: BuildOptions, specs, normalizer: Normalizer, vocab: dict | None) -> dict:
    return {
        "format_version": fmt.FORMAT_VERSION,
        "inputs": [{"path": s.label, "format": s.format, "manifest_sha256": s.manifest_sha256,
                    **({"subset": s.subset} if s.subset else {}), **({"split": s.split} if s.split else {})}
                   for s in specs],
        "keep_fields": opts.keep_fields,
        "text_column": opts.text_column,
        "audio_column": opts.audio_column,
        "audio_format": opts.audio_format,
        "normalizer": normalizer.describe(),
        "given_vocab_sha256": vocab_hash(vocab) if vocab else None,
        "min_duration": opts.min_duration,
        "max_duration": opts.max_duration,
        "shard_size": opts.shard_size,
        "seed": opts.seed,
        "sort_in_shard": opts.sort_in_shard,
        "part": list(opts.part) if opts.part else None,
    }


def _finalize(out: Path, shards: list[dict], fingerprint: dict, vocab: dict | None, rejects_rows: Iterable[str],
              builder: dict, max_reject_fraction: float) -> dict:
    """vocab.json, rejects.tsv and, last, index.json: from then on the set is complete (and marked
    failed when more than ``max_reject_fraction`` of its items were rejected: training refuses it)."""
    chars = Counter()
    for s in shards:
        chars.update(s["characters"])
    if vocab is None:
        vocab = build_vocab(chars)
    fmt.write_bytes_atomic(out / fmt.VOCAB_NAME, vocab_json_bytes(vocab))
    rows = list(rejects_rows)
    fmt.write_bytes_atomic(out / fmt.REJECTS_NAME, (fmt.REJECTS_HEADER + "".join(rows)).encode("utf-8"))
    t0 = time.time()
    table = fmt.sample_table_bytes(out, shards, fingerprint["audio_format"])
    fmt.write_bytes_atomic(out / fmt.SAMPLES_NAME, table)
    log.info("wrote %s (%d samples) in %.1f s", fmt.SAMPLES_NAME, table.count(b"\n") - 1, time.time() - t0)
    total_seconds = sum(s["audio_seconds"] for s in shards)
    kept = sum(s["num_samples"] for s in shards)
    index = {
        "format_version": fmt.FORMAT_VERSION,
        "sample_rate": SAMPLE_RATE,
        "audio_format": fingerprint["audio_format"],
        "shard_size": fingerprint["shard_size"],
        "num_shards": len(shards),
        "num_samples": sum(s["num_samples"] for s in shards),
        "audio_seconds": round(total_seconds, 3),
        "audio_hours": round(total_seconds / 3600, 4),
        "last_shard_short": bool(shards) and shards[-1]["num_samples"] < fingerprint["shard_size"],
        "shards": [{k: s[k] for k in ("name", "num_samples", "audio_seconds", "bytes", "sha256")} for s in shards],
        "duration_histogram": {"bin_seconds": fmt.HIST_BIN_SECONDS, "counts": fmt.histogram_merge(s["histogram"] for s in shards)},
        "characters": dict(sorted(chars.items())),
        "fields": fmt.fields_summary(s.get("fields", {}) for s in shards),
        "text_normalizer": fingerprint["normalizer"],
        "vocab_sha256": vocab_hash(vocab),
        "num_rejected": len(rows),
        "samples_table": {"name": fmt.SAMPLES_NAME, "bytes": len(table), "sha256": hashlib.sha256(table).hexdigest()},
        "build_failed": fmt.failure_mark(len(rows) / (kept + len(rows)) if rows else 0.0, max_reject_fraction),
        "seed": fingerprint["seed"],
        "sorted_in_shard": fingerprint["sort_in_shard"] and fingerprint["part"] is None,
        "part": fingerprint["part"],
        "builder": builder,
        "inputs": fingerprint["inputs"],
        "fingerprint": fingerprint,
    }
    fmt.write_json_atomic(out / fmt.INDEX_NAME, index, indent=1)
    (out / fmt.STATE_NAME).unlink(missing_ok=True)
    return index


def _remark(out: Path, index: dict, summary: BuildSummary) -> None:
    """A complete set confirmed with another --max-reject-fraction: its failure mark follows the new limit."""
    mark = fmt.failure_mark(summary.reject_fraction, summary.max_reject_fraction)
    if index.get("build_failed") != mark:
        fmt.write_json_atomic(out / fmt.INDEX_NAME, {**index, "build_failed": mark}, indent=1)


def _summary_from_index(index: dict, opts_out: str, max_frac: float) -> BuildSummary:
    rejects: Counter = Counter()
    path = Path(opts_out) / fmt.REJECTS_NAME
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        rejects[line.split("\t")[2]] += 1
    return BuildSummary(
        output=opts_out, num_kept=index["num_samples"], num_shards=index["num_shards"],
        audio_seconds=index["audio_seconds"], rejects=rejects, max_reject_fraction=max_frac,
    )


def default_stage_dir(url: str) -> str:
    """Where `shards build --output URL` builds before the upload: one directory per URL, so that a build that
    stopped resumes there."""
    return os.path.join(tempfile.gettempdir(), f"asr-dist-stage-{hashlib.sha256(url.encode()).hexdigest()[:16]}")


def build_to_url(opts: BuildOptions, stage_dir: str | None = None) -> BuildSummary:
    """`shards build --output s3://…`: the set is built in ``stage_dir`` (resumable there), verified, and
    uploaded with index.json last; the staging directory is removed once the upload is whole. A set already at
    the URL with another index.json needs ``opts.overwrite`` (``publish``)."""
    url = opts.output
    stage = stage_dir or default_stage_dir(url)
    log.info("building in %s, then uploading to %s", stage, url)
    summary = build(dataclasses.replace(opts, output=stage))
    summary.output = url
    if opts.dry_run:
        return summary
    publish(stage, url, overwrite=opts.overwrite, progress=opts.progress)
    shutil.rmtree(stage, ignore_errors=True)
    return summary


def publish(directory: str | os.PathLike, url: str, overwrite: bool = False, progress: bool = True) -> bool:
    """Verify the finished shard set in ``directory`` and upload it to ``url`` with index.json last (`shards
    upload`); False when ``url`` holds this very set already (nothing is uploaded). Another set there needs
    ``overwrite``: its index.json is deleted first, so no reader meets a half-replaced set."""
    from .verify import verify

    fmt.read_index(directory)  # a complete set, or the reason it is not
    problems = verify(str(directory), progress=progress)
    if problems:
        raise fmt.ShardError(f"{directory}: the set failed verification, so nothing was uploaded to {url}: "
                             f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    built = (Path(directory) / fmt.INDEX_NAME).read_bytes()
    try:
        there = remote.read_file(url, fmt.INDEX_NAME)
    except FileNotFoundError:
        there = None
    if there == built:
        log.info("%s already holds this shard set; nothing uploaded", url)
        return False
    if there is not None:
        if not overwrite:
            raise InputError(f"{url} already holds another shard set; pass --overwrite to replace it, or "
                             f"choose another --output")
        remote.remove(remote.join(url, fmt.INDEX_NAME))
    remote.upload_set(directory, url, progress=progress)
    return True


def build(opts: BuildOptions) -> BuildSummary:
    """Build (or finish, or confirm) the shard set that ``opts`` describe."""
    if remote.is_url(opts.output):
        raise InputError(f"--output {opts.output}: a URL; build_to_url builds locally and uploads")
    t0 = time.time()
    normalizer = Normalizer(opts.normalizer, **opts.normalizer_settings)
    vocab = load_vocab(opts.vocab) if opts.vocab else None
    specs = [resolve_input(p, opts.input_format, opts.subset, opts.split) for p in opts.inputs]
    out = Path(opts.output)
    fingerprint = _fingerprint(opts, specs, normalizer, vocab)
    complete = _complete_index(out, fingerprint) if not (opts.dry_run or opts.overwrite) else None
    if complete is not None:  # before the scan, which copies the audio of parquet/arrow inputs
        s = _summary_from_index(complete, opts.output, opts.max_reject_fraction)
        s.already_complete = True
        _remark(out, complete, s)
        return s
    if opts.keep_fields is not None:  # parquet/arrow schemas name their fields: a typo stops before any audio is copied
        known = {s.label: table_fields(s, opts.text_column, opts.audio_column) for s in specs}
        if all(f is not None for f in known.values()):
            check_keep_fields(opts.keep_fields, known)
    tables = any(s.format in ("hf-hub", "hf-cache") for s in specs)
    spill_dir = None
    if tables:
        # beside the output (the same disk, sized for the corpus); a dry run writes nothing there
        if not opts.dry_run:
            out.mkdir(parents=True, exist_ok=True)
        spill_dir = Path(tempfile.mkdtemp(prefix=".spill-", dir=None if opts.dry_run else out))
    try:
        spill = Spill(spill_dir / "audio.bin") if spill_dir else None
        return _build(opts, t0, specs, out, fingerprint, normalizer, vocab, spill)
    finally:
        if spill_dir is not None:
            spill.close()
            shutil.rmtree(spill_dir, ignore_errors=True)


def _complete_index(out: Path, fingerprint: dict) -> dict | None:
    p = out / fmt.INDEX_NAME
    if not p.exists():
        return None
    existing = json.loads(p.read_text(encoding="utf-8"))
    return existing if existing.get("fingerprint") == fingerprint else None


def _build(opts: BuildOptions, t0: float, specs, out: Path, fingerprint: dict, normalizer: Normalizer,
           vocab: dict | None, spill: Spill | None) -> BuildSummary:
    items, rejects = scan(opts, specs, normalizer, vocab, spill)
    if spill is not None:
        spill.flush()
    log.info("scanned %d inputs: %d items, %d rejected by text or key", len(specs), len(items), len(rejects))
    if not opts.dry_run:
        existing, finished = _prepare_output(out, fingerprint, opts.overwrite)
        if existing is not None:
            s = _summary_from_index(existing, opts.output, opts.max_reject_fraction)
            s.already_complete = True
            _remark(out, existing, s)
            return s

    work = {"min_duration": opts.min_duration, "max_duration": opts.max_duration}
    kept: list[Item] = []
    seconds = 0.0
    with tqdm(desc="reading audio", total=len(items), unit="utt", disable=not opts.progress, mininterval=1.0,
              dynamic_ncols=True) as bar:
        for it, (status, a, b) in zip(items, _map(check_item, items, work, opts.workers)):
            if status == "ok":
                kept.append(it)
                seconds += a
                bar.set_postfix(hours=f"{seconds / 3600:.2f}", refresh=False)
            else:
                rejects.append(Reject(it.input, it.item, a, b))
            bar.update()
    summary = BuildSummary(output=opts.output, num_items=len(kept) + len(rejects),
                           num_kept=len(kept), audio_seconds=seconds, max_reject_fraction=opts.max_reject_fraction,
                           dry_run=opts.dry_run)
    summary.rejects.update(r.reason for r in rejects)
    if opts.dry_run:
        summary.elapsed = time.time() - t0
        return summary

    # parts are written unsorted: the merge restores the global order and sorts then
    tasks = _plan(out, kept, opts.shard_size, opts.audio_format, opts.sort_in_shard and opts.part is None)
    shards = _write_shards(out, tasks, finished, fingerprint, opts.workers, opts.progress, "writing shards")
    builder = {"name": "asr-dist", "version": __version__, "arguments": _public_args(opts)}
    _finalize(out, shards, fingerprint, vocab, (r.tsv_row() for r in rejects), builder, opts.max_reject_fraction)
    summary.num_shards = len(shards)
    summary.audio_seconds = sum(s["audio_seconds"] for s in shards)
    summary.elapsed = time.time() - t0
    summary.processed_seconds = sum(s["audio_seconds"] for s in shards if s["name"] not in finished)
    return summary


def _public_args(opts: BuildOptions) -> dict:
    d = dataclasses.asdict(opts)
    for k in ("progress", "overwrite", "dry_run"):
        d.pop(k)
    d["part"] = list(opts.part) if opts.part else None
    return d


# ───────────────────────────── merging parts ─────────────────────────────


def _check_parts(dirs: list[Path]) -> tuple[list[dict], dict]:
    indexes = [fmt.read_index(d) for d in dirs]
    base = {k: v for k, v in indexes[0]["fingerprint"].items() if k != "part"}
    seen: dict[int, Path] = {}
    for d, idx in zip(dirs, indexes):
        fp = idx["fingerprint"]
        if fp.get("part") is None:
            raise InputError(f"{d} is not a part (built without --part); nothing to merge")
        other = {k: v for k, v in fp.items() if k != "part"}
        if other != base:
            diff = sorted(k for k in base if base[k] != other.get(k))
            raise InputError(f"{d} was built with other arguments than {dirs[0]} (differ: {', '.join(diff)}); "
                             f"parts must share all but --part")
        i, n = fp["part"]
        if i in seen:
            raise InputError(f"{d} and {seen[i]} are both part {i}/{n}")
        seen[i] = d
    n = indexes[0]["fingerprint"]["part"][1]
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise InputError(f"parts {missing} of {n} are missing; give every part directory to merge")
    return indexes, base


def merge(parts: list[str], output: str, overwrite: bool = False, progress: bool = True, workers: int = 1,
          max_reject_fraction: float = 1.0) -> BuildSummary:
    """Join the shard sets of ``--part 0/N … N-1/N`` builds into one set, equal to a single build.

    Samples are copied as the tar blocks they are (no decoding); the global order and the shard
    boundaries are recomputed exactly as one build of the whole corpus would have made them."""
    t0 = time.time()
    dirs = [Path(p) for p in parts]
    indexes, base = _check_parts(dirs)
    fingerprint = dict(base, part=None)
    out = Path(output)
    existing, finished = _prepare_output(out, fingerprint, overwrite)
    if existing is not None:
        s = _summary_from_index(existing, output, max_reject_fraction)
        s.already_complete = True
        _remark(out, existing, s)
        return s
    slices: list[TarSlice] = []
    for d, idx in zip(dirs, indexes):
        for shard in idx["shards"]:
            path = d / shard["name"]
            for loc in fmt.list_shard(path):
                slices.append(TarSlice(loc.key, str(path), loc.start, loc.end, json.loads(loc.meta)))
    slices.sort(key=lambda s: order_key(base["seed"], s.key))
    tasks = _plan(out, slices, base["shard_size"], base["audio_format"], base["sort_in_shard"])
    shards = _write_shards(out, tasks, finished, fingerprint, workers, progress, "merging")
    rejects = []
    for d in dirs:
        rejects.extend(line + "\n" for line in (d / fmt.REJECTS_NAME).read_text(encoding="utf-8").splitlines()[1:])
    vocab = load_vocab(dirs[0] / fmt.VOCAB_NAME) if base["given_vocab_sha256"] is not None else None
    builder = {"name": "asr-dist", "version": __version__, "merged_from": [str(d) for d in dirs],
               "arguments": dict(indexes[0]["builder"]["arguments"], part=None)}
    index = _finalize(out, shards, fingerprint, vocab, rejects, builder, max_reject_fraction)
    s = _summary_from_index(index, output, max_reject_fraction)
    s.elapsed = time.time() - t0
    return s
