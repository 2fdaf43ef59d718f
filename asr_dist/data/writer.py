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
import heapq
import io
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from tqdm import tqdm

from .. import __version__
from ..audio import SAMPLE_RATE, AudioError, decode, encode, num_ctc_frames, to_16k
from ..text import (
    Normalizer,
    TextReject,
    build_vocab,
    ctc_min_frames,
    load_vocab,
    vocab_chars,
    vocab_hash,
    vocab_json_bytes,
)
from . import index as fmt
from .sources import InputError, Item, Reject, load_item_audio, read_input, resolve_input

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildOptions:
    """Everything `asr-dist shards build` takes; see its --help for each option."""

    inputs: list[str]
    output: str
    input_format: str | None = None
    text_column: str | None = None
    audio_column: str | None = None
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
            + (f", listed in {Path(self.output) / fmt.REJECTS_NAME}" if self.num_rejected and not self.dry_run else ""),
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


def scan(opts: BuildOptions, specs, normalizer: Normalizer, vocab: dict | None) -> tuple[list[Item], list[Reject]]:
    """All items of all inputs, text normalised, duplicates and text rejects removed, in shuffle order."""
    allowed = vocab_chars(vocab) if vocab else None
    items: list[Item] = []
    rejects: list[Reject] = []
    seen: dict[str, Item] = {}
    for spec in specs:
        for it in read_input(spec, opts.text_column, opts.audio_column):
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
    items.sort(key=lambda it: order_key(opts.seed, it.key))
    return items, rejects


# ───────────────────────────── per-item work (in pool workers) ─────────────────────────────

_WORK: dict = {}


def _init_worker(work: dict) -> None:
    _WORK.clear()
    _WORK.update(work)


def process_item(item: Item):
    """("ok", audio bytes, meta) or ("reject", reason, detail) for one item."""
    w = _WORK
    try:
        audio, sr = decode(load_item_audio(item), item.offset, item.duration)
        seconds = len(audio) / sr
        if seconds < w["min_duration"]:
            return "reject", "too_short", f"{seconds:.2f} s < --min-duration {w['min_duration']}"
        if seconds > w["max_duration"]:
            return "reject", "too_long", f"{seconds:.2f} s > --max-duration {w['max_duration']}"
        audio = to_16k(audio, sr)
        frames = num_ctc_frames(len(audio))
        need = ctc_min_frames(item.text)
        if need > frames:
            return "reject", "text_too_long", f"{need} CTC labels need more than the {frames} frames of {seconds:.2f} s"
        data = encode(audio, w["audio_format"])
    except AudioError as e:
        return "reject", e.reason, e.detail
    except Exception as e:  # a bug or an exotic file: reject it with the cause rather than lose the build
        return "reject", "error", f"{type(e).__name__}: {e}"
    meta = {
        "text": item.text,
        "text_raw": item.text_raw,
        "duration": round(len(audio) / SAMPLE_RATE, 6),
        "num_samples": len(audio),
        "source": item.input,
        "id": item.item,
        "audio_sha256": hashlib.sha256(data).hexdigest(),
    }
    if item.speaker is not None:
        meta["speaker"] = item.speaker
    return "ok", data, meta


def probe_item(item: Item):
    """Dry run: duration from the header only, no decoding of samples."""
    import soundfile as sf

    try:
        data = load_item_audio(item)
        if not data:
            return "reject", "empty_audio", "file has zero bytes"
        info = sf.info(io.BytesIO(data))
        seconds = info.frames / info.samplerate - item.offset
        if item.duration is not None:
            seconds = min(seconds, item.duration)
    except AudioError as e:
        return "reject", e.reason, e.detail
    except Exception as e:
        return "reject", "corrupt_audio", str(e).strip() or type(e).__name__
    if seconds <= 0:
        return "reject", "empty_audio", "no samples"
    if seconds < _WORK["min_duration"]:
        return "reject", "too_short", f"{seconds:.2f} s"
    if seconds > _WORK["max_duration"]:
        return "reject", "too_long", f"{seconds:.2f} s"
    return "ok", None, {"duration": seconds}


def _map(fn, items: list[Item], work: dict, workers: int) -> Iterator:
    """fn over items in order, in ``workers`` processes (inline when 1)."""
    if workers == 1 or len(items) < 2:
        _init_worker(work)
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(work,)) as pool:
        yield from pool.imap(fn, items, chunksize=8)


# ───────────────────────────── writing shards ─────────────────────────────


class ShardSetWriter:
    """Equal-count shards written atomically, progress recorded after each shard.

    ``add`` takes samples in their final order; ``position`` counts the stream elements consumed
    so far (items for a build, samples for a merge), so a restart knows where to continue.
    """

    def __init__(self, out: Path, fingerprint: dict, shard_size: int, sort_in_shard: bool):
        self.out = out
        self.fingerprint = fingerprint
        self.shard_size = shard_size
        self.sort_in_shard = sort_in_shard
        self.shards: list[dict] = []
        self.position = 0
        self.buffer: list[tuple[str, dict[str, bytes], dict]] = []
        rejects_bytes = 0
        state_path = out / fmt.STATE_NAME
        if state_path.exists():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if state.get("fingerprint") == fingerprint:
                rejects_bytes = self._restore(state)
        partial = out / fmt.REJECTS_PARTIAL
        self.rejects = open(partial, "r+b" if partial.exists() else "w+b")
        self.rejects.truncate(rejects_bytes)
        self.rejects.seek(rejects_bytes)

    def _restore(self, state: dict) -> int:
        """Keep the prefix of finished shards whose checksums still match; return the rejects offset."""
        kept: list[dict] = []
        for entry in state["shards"]:
            p = self.out / entry["name"]
            if not p.exists() or p.stat().st_size != entry["bytes"] or _sha256_file(p) != entry["sha256"]:
                log.warning("%s is missing or damaged; rebuilding from there", p)
                break
            kept.append(entry)
        self.shards = kept
        if kept:
            self.position = kept[-1]["position_after"]
            log.info("resuming: %d finished shards kept, continuing at item %d", len(kept), self.position)
            return kept[-1]["rejects_bytes_after"]
        return 0

    def reject(self, r: Reject) -> None:
        self.rejects.write(r.tsv_row().encode("utf-8"))

    def add(self, key: str, files: dict[str, bytes], meta: dict) -> None:
        self.buffer.append((key, files, meta))

    def advance(self, position: int) -> None:
        """Mark the stream consumed up to ``position``; writes a shard when the buffer is full."""
        self.position = position
        if len(self.buffer) >= self.shard_size:
            self._write_shard()

    def finish(self) -> list[dict]:
        if self.buffer:
            self._write_shard()
        self.rejects.flush()
        return self.shards

    def rejects_text(self) -> str:
        self.rejects.flush()
        self.rejects.seek(0)
        text = self.rejects.read().decode("utf-8")
        self.rejects.seek(0, os.SEEK_END)
        return text

    def close(self, remove_progress: bool) -> None:
        self.rejects.close()
        if remove_progress:
            for name in (fmt.STATE_NAME, fmt.REJECTS_PARTIAL):
                (self.out / name).unlink(missing_ok=True)

    def _write_shard(self) -> None:
        samples = self.buffer
        self.buffer = []
        if self.sort_in_shard:
            samples.sort(key=lambda s: (s[2]["duration"], s[0]))
        buf = io.BytesIO()
        hist: dict[str, int] = {}
        chars: Counter = Counter()
        seconds = 0.0
        # fixed mtime, owner and mode: the same samples give the same bytes
        with wds.TarWriter(buf, encoder=False, mtime=0, user="asr-dist", group="asr-dist", format="PAX_FORMAT") as tw:
            for key, files, meta in samples:
                tw.write({"__key__": key, **files, "json": _meta_bytes(meta)})
                seconds += meta["duration"]
                fmt.histogram_add(hist, meta["duration"])
                chars.update(meta["text"])
        data = buf.getvalue()
        name = fmt.SHARD_PATTERN.format(len(self.shards))
        fmt.write_bytes_atomic(self.out / name, data)
        self.rejects.flush()
        os.fsync(self.rejects.fileno())
        self.shards.append({
            "name": name,
            "num_samples": len(samples),
            "audio_seconds": round(seconds, 3),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "histogram": hist,
            "characters": dict(sorted(chars.items())),
            "position_after": self.position,
            "rejects_bytes_after": self.rejects.tell(),
        })
        fmt.write_json_atomic(self.out / fmt.STATE_NAME, {"fingerprint": self.fingerprint, "shards": self.shards})


def _meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _prepare_output(out: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """The existing index when this exact set is already complete; otherwise make ``out`` ready."""
    index_path = out / fmt.INDEX_NAME
    state_path = out / fmt.STATE_NAME
    if index_path.exists():
        existing = json.loads(index_path.read_text(encoding="utf-8"))
        if existing.get("fingerprint") == fingerprint and not overwrite:
            return existing
    ours = [p for p in out.iterdir() if fmt.SHARD_RE.match(p.name) or p.name in (
        fmt.INDEX_NAME, fmt.VOCAB_NAME, fmt.REJECTS_NAME, fmt.STATE_NAME, fmt.REJECTS_PARTIAL)
        or p.name.endswith(".tmp")] if out.exists() else []
    if ours:
        same_run = state_path.exists() and json.loads(state_path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
        if overwrite:
            log.warning("--overwrite: removing the shard set in %s", out)
            for p in ours:
                p.unlink()
        elif not same_run:
            what = "a different shard set" if index_path.exists() else "shards from another, unfinished build"
            raise InputError(
                f"{out} already holds {what}; pass --overwrite to replace it, or choose another --output"
            )
    out.mkdir(parents=True, exist_ok=True)
    return None


def _fingerprint(opts: BuildOptions, specs, normalizer: Normalizer, vocab: dict | None) -> dict:
    return {
        "format_version": fmt.FORMAT_VERSION,
        "inputs": [{"path": s.label, "format": s.format, "manifest_sha256": s.manifest_sha256} for s in specs],
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


def _finalize(out: Path, writer: ShardSetWriter, shards: list[dict], fingerprint: dict, vocab: dict | None,
              rejects_head: Iterable[str], builder: dict, extra: dict) -> dict:
    """vocab.json, rejects.tsv and, last, index.json: from then on the set is complete."""
    chars = Counter()
    for s in shards:
        chars.update(s["characters"])
    if vocab is None:
        vocab = build_vocab(chars)
    fmt.write_bytes_atomic(out / fmt.VOCAB_NAME, vocab_json_bytes(vocab))
    rejects = fmt.REJECTS_HEADER + "".join(rejects_head) + writer.rejects_text()
    fmt.write_bytes_atomic(out / fmt.REJECTS_NAME, rejects.encode("utf-8"))
    total_seconds = sum(s["audio_seconds"] for s in shards)
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
        "text_normalizer": fingerprint["normalizer"],
        "vocab_sha256": vocab_hash(vocab),
        "num_rejected": rejects.count("\n") - 1,
        "seed": fingerprint["seed"],
        "sorted_in_shard": fingerprint["sort_in_shard"] and fingerprint["part"] is None,
        "part": fingerprint["part"],
        "builder": builder,
        "inputs": fingerprint["inputs"],
        "fingerprint": fingerprint,
        **extra,
    }
    fmt.write_json_atomic(out / fmt.INDEX_NAME, index, indent=1)
    writer.close(remove_progress=True)
    return index


def _summary_from_index(index: dict, opts_out: str, max_frac: float) -> BuildSummary:
    rejects: Counter = Counter()
    path = Path(opts_out) / fmt.REJECTS_NAME
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        rejects[line.split("\t")[2]] += 1
    return BuildSummary(
        output=opts_out, num_kept=index["num_samples"], num_shards=index["num_shards"],
        audio_seconds=index["audio_seconds"], rejects=rejects, max_reject_fraction=max_frac,
    )


def build(opts: BuildOptions) -> BuildSummary:
    """Build (or finish, or confirm) the shard set that ``opts`` describe."""
    t0 = time.time()
    normalizer = Normalizer(opts.normalizer, **opts.normalizer_settings)
    vocab = load_vocab(opts.vocab) if opts.vocab else None
    specs = [resolve_input(p, opts.input_format) for p in opts.inputs]
    items, scan_rejects = scan(opts, specs, normalizer, vocab)
    log.info("scanned %d inputs: %d items, %d rejected by text or key", len(specs), len(items), len(scan_rejects))
    work = {"min_duration": opts.min_duration, "max_duration": opts.max_duration, "audio_format": opts.audio_format}
    summary = BuildSummary(output=opts.output, num_items=len(items) + len(scan_rejects),
                           max_reject_fraction=opts.max_reject_fraction, dry_run=opts.dry_run)
    summary.rejects.update(r.reason for r in scan_rejects)
    bar = dict(total=len(items), unit="utt", disable=not opts.progress, mininterval=1.0, dynamic_ncols=True)

    if opts.dry_run:
        with tqdm(desc="probing", **bar) as pbar:
            for status, reason, info in _map(probe_item, items, work, opts.workers):
                pbar.update()
                if status == "ok":
                    summary.num_kept += 1
                    summary.audio_seconds += info["duration"]
                else:
                    summary.rejects[reason] += 1
        summary.elapsed = time.time() - t0
        return summary

    out = Path(opts.output)
    fingerprint = _fingerprint(opts, specs, normalizer, vocab)
    existing = _prepare_output(out, fingerprint, opts.overwrite)
    if existing is not None:
        s = _summary_from_index(existing, opts.output, opts.max_reject_fraction)
        s.already_complete = True
        return s

    # parts are written unsorted: the merge restores the global order and sorts then
    writer = ShardSetWriter(out, fingerprint, opts.shard_size, opts.sort_in_shard and opts.part is None)
    start = writer.position
    todo = items[start:]
    processed_seconds = 0.0
    try:
        with tqdm(desc="building shards", initial=start, **bar) as pbar:
            for pos, (it, (status, a, b)) in enumerate(zip(todo, _map(process_item, todo, work, opts.workers)), start + 1):
                if status == "ok":
                    writer.add(it.key, {opts.audio_format: a}, b)
                    processed_seconds += b["duration"]
                    pbar.set_postfix(hours=f"{processed_seconds / 3600:.2f}", refresh=False)
                else:
                    writer.reject(Reject(it.input, it.item, a, b))
                writer.advance(pos)
                pbar.update()
        shards = writer.finish()
    except BaseException:
        writer.close(remove_progress=False)
        raise
    builder = {"name": "asr-dist", "version": __version__, "arguments": _public_args(opts)}
    index = _finalize(out, writer, shards, fingerprint, vocab, [r.tsv_row() for r in scan_rejects], builder, {})
    s = _summary_from_index(index, opts.output, opts.max_reject_fraction)
    s.num_items = summary.num_items
    s.elapsed = time.time() - t0
    s.processed_seconds = processed_seconds
    return s


def _public_args(opts: BuildOptions) -> dict:
    d = dataclasses.asdict(opts)
    for k in ("progress", "overwrite", "dry_run"):
        d.pop(k)
    d["part"] = list(opts.part) if opts.part else None
    return d


# ───────────────────────────── merging parts ─────────────────────────────


def _part_stream(directory: Path, seed: int) -> Iterator[tuple[bytes, str, dict[str, bytes], dict]]:
    index = fmt.read_index(directory)
    for shard in index["shards"]:
        for key, files in fmt.iter_shard(directory / shard["name"]):
            meta = json.loads(files.pop("json"))
            yield order_key(seed, key), key, files, meta


def merge(parts: list[str], output: str, overwrite: bool = False, progress: bool = True) -> BuildSummary:
    """Join the shard sets of ``--part 0/N … N-1/N`` builds into one set, equal to a single build."""
    t0 = time.time()
    dirs = [Path(p) for p in parts]
    indexes = [fmt.read_index(d) for d in dirs]
    base = {k: v for k, v in indexes[0]["fingerprint"].items() if k != "part"}
    seen_parts = {}
    for d, idx in zip(dirs, indexes):
        fp = idx["fingerprint"]
        if fp.get("part") is None:
            raise InputError(f"{d} is not a part (built without --part); nothing to merge")
        other = {k: v for k, v in fp.items() if k != "part"}
        if other != base:
            diff = sorted(k for k in base if base[k] != other.get(k))
            raise InputError(f"{d} was built with other arguments than {dirs[0]} (differ: {', '.join(diff)}); parts must share all but --part")
        i, n = fp["part"]
        if i in seen_parts:
            raise InputError(f"{d} and {seen_parts[i]} are both part {i}/{n}")
        seen_parts[i] = d
    n = indexes[0]["fingerprint"]["part"][1]
    missing = sorted(set(range(n)) - set(seen_parts))
    if missing:
        raise InputError(f"parts {missing} of {n} are missing; give every part directory to merge")
    fingerprint = dict(base, part=None)
    out = Path(output)
    existing = _prepare_output(out, fingerprint, overwrite)
    if existing is not None:
        s = _summary_from_index(existing, output, 1.0)
        s.already_complete = True
        return s
    writer = ShardSetWriter(out, fingerprint, base["shard_size"], base["sort_in_shard"])
    skip = writer.position
    total = sum(idx["num_samples"] for idx in indexes)
    stream = heapq.merge(*(_part_stream(d, base["seed"]) for d in dirs), key=lambda s: s[0])
    try:
        with tqdm(desc="merging", total=total, initial=skip, unit="utt", disable=not progress, mininterval=1.0) as pbar:
            for pos, (_, key, files, meta) in enumerate(stream, 1):
                if pos <= skip:
                    continue
                writer.add(key, files, meta)
                writer.advance(pos)
                pbar.update()
        shards = writer.finish()
    except BaseException:
        writer.close(remove_progress=False)
        raise
    rejects = []
    for d in dirs:
        rejects.extend(line + "\n" for line in (d / fmt.REJECTS_NAME).read_text(encoding="utf-8").splitlines()[1:])
    vocab = None
    if base["given_vocab_sha256"] is not None:
        vocab = load_vocab(dirs[0] / fmt.VOCAB_NAME)
    builder = {"name": "asr-dist", "version": __version__, "merged_from": [str(d) for d in dirs],
               "arguments": dict(indexes[0]["builder"]["arguments"], part=None)}
    index = _finalize(out, writer, shards, fingerprint, vocab, rejects, builder, {})
    s = _summary_from_index(index, output, 1.0)
    s.elapsed = time.time() - t0
    return s
