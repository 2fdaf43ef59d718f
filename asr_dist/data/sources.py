"""Corpus readers: every supported input layout to a flat list of ``Item``s and ``Reject``s.

  Common Voice TSV or release dir ─┐
  NeMo JSONL ──────────────────────┤
  HF audiofolder ──────────────────┤
  datasets on disk / cache ────────┼──> read_input ──> [Item(key, audio ref, text_raw, speaker, fields)] + [Reject]
  HF Hub repo (parquet) ───────────┤
  Kaldi data dir ──────────────────┘

Reading a manifest is cheap: no audio is opened here. Every line, row or utterance that cannot
become an item is returned as a Reject naming the input and the line, so nothing is lost quietly.
Structural problems (a missing column, an unknown layout) raise ``InputError`` with what was found
and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from . import hub
from .items import (
    AUDIO_COLUMNS,
    RESERVED_FIELDS,
    SPEAKER_COLUMNS,
    TEXT_COLUMNS,
    InputError,
    Item,
    Reject,
    file_stem,
    make_key,
    pick_column,
)

FORMATS = ("commonvoice", "nemo", "audiofolder", "hf-dataset", "hf-hub", "hf-cache", "kaldi")
# layouts with splits; the others ignore --split and --subset
SPLIT_FORMATS = ("commonvoice", "hf-hub", "hf-cache", "hf-dataset")
COMMONVOICE_SPLITS = ("train", "dev", "test", "validated", "other", "invalidated")
# Common Voice's demographic columns kept by default ("speaker" is its client_id)
COMMONVOICE_FIELDS = ("speaker", "age", "gender", "accents")


def _segment_key(stem: str, offset: float) -> str:
    return make_key(stem if not offset else f"{stem}-{int(round(offset * 1000)):09d}")


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".tsv":
            return "commonvoice"
        if path.suffix.lower() in (".json", ".jsonl"):
            return "nemo"
        raise InputError(
            f"{path}: cannot tell the layout of this file; expected a Common Voice .tsv or a NeMo "
            f".json/.jsonl manifest (or pass --input-format)"
        )
    if path.is_dir():
        if (path / "wav.scp").exists():
            return "kaldi"
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf-dataset"
        if (path / "clips").is_dir() and any((path / f"{s}.tsv").exists() for s in COMMONVOICE_SPLITS):
            return "commonvoice"
        if hub.is_cache_dir(path):
            return "hf-cache"
        if hub.is_hub_repo(path):
            return "hf-hub"
        if any(path.rglob("metadata.csv")) or any(path.rglob("metadata.jsonl")):
            return "audiofolder"
        raise InputError(
            f"{path}: a directory without wav.scp (Kaldi), state.json/dataset_dict.json (datasets "
            f"save_to_disk), dataset_info.json + *.arrow (datasets cache), *.parquet (Hugging Face dataset "
            f"repository), clips/ + train.tsv … (Common Voice release) or metadata.csv/metadata.jsonl "
            f"(audiofolder); point --input at one of those, or at a Common Voice .tsv or NeMo manifest file"
        )
    raise InputError(f"{path}: no such file or directory")


def manifest_files(path: Path, fmt: str) -> list[Path]:
    """The small files that define an input (hashed into index.json); audio is not hashed."""
    if fmt in ("commonvoice", "nemo"):
        return [path] if path.is_file() else sorted(path.glob("*.tsv"))
    if fmt in ("hf-hub", "hf-cache"):
        return hub.manifest_files(path, fmt)
    if fmt == "kaldi":
        return [path / n for n in ("wav.scp", "text", "segments", "utt2spk") if (path / n).exists()]
    if fmt == "audiofolder":
        return sorted(list(path.rglob("metadata.csv")) + list(path.rglob("metadata.jsonl")))
    return sorted(p for p in path.rglob("*.json"))


_TABLE_SUFFIXES = (".parquet", ".arrow")
_TABLE_TAIL = 1 << 20


def hash_files(paths: list[Path]) -> str:
    """SHA-256 over the files' names and bytes; of a parquet or arrow table (gigabytes of audio) only
    its size and last MiB (a parquet footer holds every row group's statistics)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode() + b"\0")
        with open(p, "rb") as f:
            if p.suffix in _TABLE_SUFFIXES:
                size = os.fstat(f.fileno()).st_size
                h.update(str(size).encode() + b"\0")
                f.seek(max(0, size - _TABLE_TAIL))
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _lines(path: Path, label: str) -> Iterator[tuple[int, str | None, Reject | None]]:
    """(line number, decoded line, None) or (line number, None, Reject) for lines that are not UTF-8."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as e:
                yield n, None, Reject(label, f"{path.name} line {n}", "bad_encoding", f"not UTF-8 ({e.reason} at byte {e.start})")


def _kept(columns, keep: list[str] | None, defaults, columns_seen: set | None) -> list[str]:
    """The input's columns to carry: ``keep`` where given, else the layout's ``defaults`` (all columns
    when None); names the sample JSON already uses are never carried."""
    if columns_seen is not None:
        columns_seen.update(columns)
    wanted = (list(columns) if defaults is None else list(defaults)) if keep is None else keep
    return [c for c in wanted if c in columns and c not in RESERVED_FIELDS and c != "speaker"]


def _values(row: dict, cols: list[str]) -> dict:
    out = {}
    for c in cols:
        v = row.get(c)
        if v is not None and v != "":
            out[c] = sys.intern(v) if isinstance(v, str) else v if isinstance(v, (bool, int, float)) else json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
    return out


def _speaker_kept(keep: list[str] | None) -> bool:
    return keep is None or "speaker" in keep


def commonvoice_tsv(path: Path, split: str | None) -> Path:
    """The TSV of ``split`` in a Common Voice release's language directory (cv-corpus-N/da)."""
    have = [s for s in COMMONVOICE_SPLITS if (path / f"{s}.tsv").exists()]
    if split is None:
        raise InputError(f"{path}: a Common Voice release with splits {', '.join(have)}; choose one with --split")
    if split not in have:
        raise InputError(f"{path}: no split {split!r} ({split}.tsv); splits found: {', '.join(have)}")
    return path / f"{split}.tsv"


def read_commonvoice(path: Path, label: str, text_column: str | None = None, keep: list[str] | None = None,
                     columns_seen: set | None = None, split: str | None = None, **_) -> Iterator[Item | Reject]:
    if path.is_dir():
        path = commonvoice_tsv(path, split)
    clips = path.parent / "clips"
    audio_dir = clips if clips.is_dir() else path.parent
    lines = _lines(path, label)
    header = None
    for n, line, rej in lines:
        if rej:
            if header is None:
                raise InputError(f"{path}: the header line is not UTF-8")
            yield rej
            continue
        if header is None:
            header = line.split("\t")
            for col in ("path",):
                if col not in header:
                    raise InputError(
                        f"{path}: missing column 'path'; a Common Voice TSV needs 'path' and 'sentence'; "
                        f"columns found: {', '.join(header)}"
                    )
            text_col = pick_column(header, text_column, ("sentence",), "text", str(path))
            speaker_col = "client_id" if "client_id" in header and _speaker_kept(keep) else None
            others = [c for c in header if c not in ("path", text_col)]
            if "client_id" in header and columns_seen is not None:
                columns_seen.add("speaker")
            kept = _kept(others, keep, [c for c in COMMONVOICE_FIELDS], columns_seen)
            continue
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            yield Reject(label, f"{path.name} line {n}", "bad_line", f"{len(fields)} fields, header has {len(header)}")
            continue
        row = dict(zip(header, fields))
        clip = row["path"]
        yield Item(
            label, f"{path.name} line {n}", make_key(file_stem(clip)), row[text_col],
            audio_path=str(audio_dir / clip), speaker=(row.get(speaker_col) or None) if speaker_col else None,
            fields=_values(row, kept),
        )


def _resolve(base: Path, p: str) -> str:
    return p if os.path.isabs(p) else str(base / p)


_NEMO_KEYS = ("audio_filepath", "offset", "duration")


def read_nemo(path: Path, label: str, text_column: str | None = None, keep: list[str] | None = None,
              columns_seen: set | None = None, **_) -> Iterator[Item | Reject]:
    text_key = text_column or "text"
    for n, line, rej in _lines(path, label):
        if rej:
            yield rej
            continue
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            yield Reject(label, where, "bad_line", f"not JSON: {e.msg}")
            continue
        if not isinstance(entry, dict) or "audio_filepath" not in entry or text_key not in entry:
            found = ", ".join(entry) if isinstance(entry, dict) else type(entry).__name__
            yield Reject(label, where, "bad_line", f"needs 'audio_filepath' and '{text_key}'; found: {found}")
            continue
        try:
            offset = float(entry.get("offset") or 0.0)
            duration = float(entry["duration"]) if entry.get("duration") is not None and "offset" in entry else None
        except (TypeError, ValueError):
            yield Reject(label, where, "bad_line", "offset/duration are not numbers")
            continue
        audio = _resolve(path.parent, entry["audio_filepath"])
        extra = [k for k in entry if k not in _NEMO_KEYS and k != text_key]
        yield Item(
            label, where, _segment_key(file_stem(audio), offset), str(entry[text_key]), audio_path=audio,
            offset=offset, duration=duration,
            speaker=str(entry["speaker"]) if entry.get("speaker") is not None and _speaker_kept(keep) else None,
            fields=_values(entry, _kept(extra, keep, None, columns_seen)),
        )


def read_audiofolder(path: Path, label: str, text_column: str | None = None, keep: list[str] | None = None,
                     columns_seen: set | None = None, **_) -> Iterator[Item | Reject]:
    metas = sorted(list(path.rglob("metadata.csv")) + list(path.rglob("metadata.jsonl")))
    for meta in metas:
        rel = meta.relative_to(path)
        rows: Iterator[tuple[str, dict | None, Reject | None]]
        if meta.suffix == ".csv":
            rows = _csv_rows(meta, label, rel)
        else:
            rows = _jsonl_rows(meta, label, rel)
        text_col = None
        for where, row, rej in rows:
            if rej:
                yield rej
                continue
            if text_col is None:
                if "file_name" not in row:
                    raise InputError(f"{meta}: no 'file_name' column; columns found: {', '.join(row)}")
                text_col = pick_column(list(row), text_column, TEXT_COLUMNS, "text", str(meta))
                speaker_col = pick_column(list(row), None, SPEAKER_COLUMNS, "speaker", str(meta), required=False)
                if speaker_col and columns_seen is not None:
                    columns_seen.add("speaker")
                if not _speaker_kept(keep):
                    speaker_col = None
                kept = _kept([c for c in row if c not in ("file_name", text_col)], keep, None, columns_seen)
            fname = row.get("file_name")
            if not isinstance(fname, str) or not fname:
                yield Reject(label, where, "bad_line", "empty file_name")
                continue
            rel_name = str((meta.parent.relative_to(path) / fname).with_suffix("")).replace(os.sep, "_")
            yield Item(
                label, where, make_key(rel_name), str(row.get(text_col) or ""), audio_path=str(meta.parent / fname),
                speaker=str(row[speaker_col]) if speaker_col and row.get(speaker_col) not in (None, "") else None,
                fields=_values(row, kept),
            )


def _csv_rows(meta: Path, label: str, rel: Path):
    header = None
    for n, line, rej in _lines(meta, label):
        if rej:
            yield f"{rel} line {n}", None, rej
            continue
        if not line.strip():
            continue
        try:
            fields = next(csv.reader(io.StringIO(line)))
        except csv.Error as e:  # e.g. a carriage return inside an unquoted field
            if header is None:
                raise InputError(f"{meta}: line {n}, the header, is not CSV ({e})") from None
            yield f"{rel} line {n}", None, Reject(label, f"{rel} line {n}", "bad_line", f"not CSV: {e}")
            continue
        if header is None:
            header = fields
            continue
        if len(fields) != len(header):
            yield f"{rel} line {n}", None, Reject(label, f"{rel} line {n}", "bad_line", f"{len(fields)} fields, header has {len(header)}")
            continue
        yield f"{rel} line {n}", dict(zip(header, fields)), None


def _jsonl_rows(meta: Path, label: str, rel: Path):
    for n, line, rej in _lines(meta, label):
        where = f"{rel} line {n}"
        if rej:
            yield where, None, rej
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as e:
            yield where, None, Reject(label, where, "bad_line", f"not a JSON object: {e}")
            continue
        yield where, row, None


def read_kaldi(path: Path, label: str, keep: list[str] | None = None, columns_seen: set | None = None,
               allow_commands: bool = False, **_) -> Iterator[Item | Reject]:
    """A Kaldi data dir. A wav.scp entry ending in '|' is a shell command, run only when the user
    allowed it: a manifest from elsewhere could run anything."""
    def table(name: str) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        f = path / name
        if not f.exists():
            return out
        for n, line, rej in _lines(f, label):
            if rej:
                continue  # reported by the pass over 'text' or counted below
            if not line.strip():
                continue
            first, _, rest = line.strip().partition(" ")
            out.setdefault(first, (rest.strip(), f"{name} line {n}"))
        return out

    if not (path / "text").exists():
        raise InputError(f"{path}: a Kaldi data dir needs 'text' beside 'wav.scp'; found: {', '.join(sorted(os.listdir(path)))}")
    wavs = table("wav.scp")
    segments = table("segments")
    spk = table("utt2spk")
    # spk2gender: the gender of each speaker, carried as the field "gender"
    gender = table("spk2gender") if spk and (keep is None or "gender" in keep) else {}
    if columns_seen is not None:
        columns_seen.update((["speaker"] if spk else []) + (["gender"] if (path / "spk2gender").exists() and spk else []))
    keep_speaker = _speaker_kept(keep)
    used_recordings = set()
    for n, line, rej in _lines(path / "text", label):
        if rej:
            yield rej
            continue
        if not line.strip():
            continue
        utt, _, words = line.strip().partition(" ")
        where = f"text line {n} ({utt})"
        offset, duration, rec = 0.0, None, utt
        if segments:
            if utt not in segments:
                yield Reject(label, where, "missing_audio_entry", f"utterance {utt} is not in segments")
                continue
            parts = segments[utt][0].split()
            try:
                rec, start, end = parts[0], float(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                yield Reject(label, where, "bad_line", f"bad segments entry: {segments[utt][0]!r}")
                continue
            offset, duration = start, end - start if end > 0 else None
        if rec not in wavs:
            yield Reject(label, where, "missing_audio_entry", f"recording {rec} is not in wav.scp")
            continue
        used_recordings.add(rec)
        wav, wav_where = wavs[rec]
        command = wav[:-1].strip() if wav.endswith("|") else None
        if command is not None and not allow_commands:
            raise InputError(f"{path / 'wav.scp'}: {wav_where.split(' ', 1)[1]} is a command ({wav!r}), which would "
                             f"run through the shell; pass --allow-commands if you trust this manifest, or "
                             f"convert the audio to files first")
        yield Item(
            label, where, make_key(utt), words, audio_path=None if command else _resolve(path, wav), command=command,
            offset=offset, duration=duration,
            speaker=spk[utt][0] if keep_speaker and utt in spk else None,
            fields={"gender": sys.intern(gender[s][0])} if (s := (spk.get(utt) or ("",))[0]) in gender else {},
        )
    if not segments:
        for rec, (_, where) in wavs.items():
            if rec not in used_recordings:
                yield Reject(label, where, "missing_transcript", f"recording {rec} has no line in 'text'")


def read_hf_dataset(
    path: Path, label: str, text_column: str | None = None, audio_column: str | None = None,
    keep: list[str] | None = None, columns_seen: set | None = None, split: str | None = None, **_
) -> Iterator[Item | Reject]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    if split is not None and isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{path}: no split {split!r}; splits found: {', '.join(loaded)}")
        splits = [(split, loaded[split])]
    for split, ds in splits:
        where_ds = f"{path} split {split}" if split else str(path)
        cols = ds.column_names
        audio_col = pick_column(cols, audio_column, AUDIO_COLUMNS, "audio", where_ds)
        text_col = pick_column(cols, text_column, TEXT_COLUMNS, "text", where_ds)
        speaker_col = pick_column(cols, None, SPEAKER_COLUMNS, "speaker", where_ds, required=False)
        paths = ds.cast_column(audio_col, datasets.Audio(decode=False))[audio_col] if isinstance(
            ds.features[audio_col], datasets.Audio) else None
        texts = ds[text_col]
        if speaker_col and columns_seen is not None:
            columns_seen.add("speaker")
        speakers = ds[speaker_col] if speaker_col and _speaker_kept(keep) else None
        kept = _kept([c for c in cols if c not in (audio_col, text_col)], keep, None, columns_seen)
        values = {c: ds[c] for c in kept}
        for i, text in enumerate(texts):
            where = f"{split + ' ' if split else ''}row {i}"
            name = (paths[i] or {}).get("path") if paths is not None else None
            key = make_key(file_stem(name)) if name else make_key(f"{split or 'row'}-{i:09d}")
            yield Item(
                label, where, key, "" if text is None else str(text), dataset=(str(path), split, i, audio_col),
                speaker=str(speakers[i]) if speakers is not None and speakers[i] is not None else None,
                fields=_values({c: v[i] for c, v in values.items()}, kept),
            )


def read_hf_tables(path: Path, label: str, fmt: str, subset: str | None = None, split: str | None = None,
                   spill=None, **kw) -> Iterator[Item | Reject]:
    subset, split, files = hub.resolve_tables(path, fmt, subset, split)
    if spill is None:
        raise InputError(f"{path}: reading a parquet/arrow dataset needs a spill file for its audio")
    yield from hub.read_tables(files, path, label, subset, split, kw.get("text_column"), kw.get("audio_column"),
                               kw.get("keep"), spill, kw.get("columns_seen") if kw.get("columns_seen") is not None else set())


def table_fields(spec: InputSpec, text_column: str | None = None, audio_column: str | None = None) -> set[str] | None:
    """The fields a parquet/arrow input offers, from its schemas (no rows read); None for other layouts,
    whose fields are known only once their manifests are read."""
    if spec.format not in ("hf-hub", "hf-cache"):
        return None
    return hub.table_fields(hub.resolve_tables(spec.path, spec.format, spec.subset, spec.split)[2], text_column,
                            audio_column)


READERS = {
    "commonvoice": read_commonvoice,
    "nemo": read_nemo,
    "audiofolder": read_audiofolder,
    "hf-dataset": read_hf_dataset,
    "hf-hub": lambda path, label, **kw: read_hf_tables(path, label, "hf-hub", **kw),
    "hf-cache": lambda path, label, **kw: read_hf_tables(path, label, "hf-cache", **kw),
    "kaldi": read_kaldi,
}


@dataclasses.dataclass
class InputSpec:
    path: Path
    format: str
    label: str
    manifest_sha256: str
    subset: str | None = None
    split: str | None = None


def resolve_input(path: str, fmt: str | None, subset: str | None = None, split: str | None = None) -> InputSpec:
    """An input's layout and identity; ``subset``/``split`` choose the part of a layout that has them
    (a Hub repository, a datasets cache or save_to_disk dir, a Common Voice release dir)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file or directory")
    fmt = fmt or detect_format(p)
    if fmt not in READERS:
        raise InputError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt in ("hf-hub", "hf-cache"):
        subset, split, _ = hub.resolve_tables(p, fmt, subset, split)
    elif fmt == "commonvoice" and p.is_dir():
        commonvoice_tsv(p, split)
        subset = None
    else:
        subset = None
        split = split if fmt == "hf-dataset" else None
    return InputSpec(p, fmt, path, hash_files(manifest_files(p, fmt)), subset, split)


def read_input(spec: InputSpec, text_column: str | None = None, audio_column: str | None = None,
               keep: list[str] | None = None, spill=None, columns_seen: set | None = None,
               allow_commands: bool = False):
    """Items and Rejects of one input; ``keep`` names the fields to carry (None: the layout's defaults),
    ``columns_seen`` collects the fields the input offers, ``spill`` takes parquet/arrow audio bytes;
    Kaldi commands run only with ``allow_commands``."""
    return READERS[spec.format](spec.path, spec.label, text_column=text_column, audio_column=audio_column,
                                keep=keep, spill=spill, columns_seen=columns_seen, subset=spec.subset,
                                split=spec.split, allow_commands=allow_commands)


_DATASETS: dict = {}


def item_audio(item: Item) -> str | bytes:
    """An item's audio for soundfile: the path of a plain file (libsndfile reads what it needs),
    or the bytes of a Kaldi command's output, a datasets row or a parquet/arrow table's row."""
    if item.blob is not None:
        return hub.read_blob(item.blob)
    if item.dataset is None and item.command is None:
        return item.audio_path
    return _item_audio_bytes(item)


def _item_audio_bytes(item: Item) -> bytes:
    from ..audio import AudioError, read_file_bytes, run_command

    if item.command is not None:
        return run_command(item.command)
    ds_path, split, row, col = item.dataset
    ds = _DATASETS.get((ds_path, split))
    if ds is None:
        import datasets

        loaded = datasets.load_from_disk(ds_path)
        ds = loaded[split] if split is not None else loaded
        if isinstance(ds.features[col], datasets.Audio):
            ds = ds.cast_column(col, datasets.Audio(decode=False))
        _DATASETS[(ds_path, split)] = ds
    value = ds[row][col]
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return read_file_bytes(_resolve(Path(ds_path), value["path"]))
    if isinstance(value, str):
        return read_file_bytes(_resolve(Path(ds_path), value))
    raise AudioError("missing_file", f"row {row} column {col!r} holds neither audio bytes nor a path")
