"""Hugging Face dataset repositories and ``datasets`` caches as builder inputs, read a row group at a time.

  repo as downloaded (README.md `configs:`, data/*.parquet, <subset>/*.parquet) ─┐
  datasets cache dir (<name>/<config>/<version>/<hash>/*.arrow + dataset_info.json) ─┴─>
  ──subset, split──> files ──one row group (parquet) / record batch (arrow) at a time──>
  ──audio bytes appended to a spill file──> Item(blob=(spill, offset, size), text, fields)

Which files make a subset's split is resolved the way the Hub resolves it, by ``datasets``'
``load_dataset_builder`` on the local directory (the card's YAML ``configs:``, or the file-name
patterns ``data/train-*`` …); no data is loaded by it. The audio itself never stays in memory: each
row group's audio bytes go to a spill file beside the output, from which the builder's passes read
each utterance by offset (the shuffle reads utterances in an order unrelated to the row groups).
Audio is decoded later with soundfile, never with ``datasets``' torchcodec.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

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

log = logging.getLogger(__name__)

_SPLIT_FILE = re.compile(r"^(?P<name>.+?)-(?P<split>[^-]+?)(?:-\d{5}-of-\d{5})?\.arrow$")


class Spill:
    """An append-only file of audio bytes; ``add`` returns the (path, offset, size) to read them back."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "ab")
        self._offset = self._f.tell()

    def add(self, data: bytes) -> tuple[str, int, int]:
        self._f.write(data)
        ref = (str(self.path), self._offset, len(data))
        self._offset += len(data)
        return ref

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_blob(ref: tuple[str, int, int]) -> bytes:
    path, offset, size = ref
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: {len(data)} of {size} bytes at offset {offset}")
    return data


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def is_hub_repo(path: Path) -> bool:
    return any(_visible(p, path) for p in path.rglob("*.parquet"))


def cache_leaves(path: Path) -> list[Path]:
    """Directories of a ``datasets`` cache that hold one prepared config: dataset_info.json + *.arrow."""
    return sorted(p.parent for p in path.rglob("dataset_info.json")
                  if any(p.parent.glob("*.arrow")) and not (p.parent / "state.json").exists())


def is_cache_dir(path: Path) -> bool:
    return bool(cache_leaves(path))


def manifest_files(path: Path, fmt: str) -> list[Path]:
    """What identifies the input cheaply: the card and the tables' footers (hashed by the caller)."""
    if fmt == "hf-hub":
        files = [p for p in path.rglob("*.parquet") if _visible(p, path)]
        card = [path / "README.md"] if (path / "README.md").exists() else []
    else:
        files = [p for p in path.rglob("*.arrow")]
        card = sorted(path.rglob("dataset_info.json"))
    return card + sorted(files)


def resolve_hub(path: Path, subset: str | None, split: str | None) -> tuple[str, str, list[Path]]:
    """(subset, split, files) of a repository as downloaded, chosen as the Hub would."""
    import datasets

    try:
        names = datasets.get_dataset_config_names(str(path))
        default = datasets.get_dataset_default_config_name(str(path))
    except Exception as e:  # noqa: BLE001 - a card datasets cannot read: say which file
        raise InputError(f"{path}: cannot read the subsets of this dataset repository ({type(e).__name__}: {e}); "
                         f"check README.md's YAML 'configs:'") from None
    if subset is None:
        subset = default or (names[0] if len(names) == 1 else None)
        if subset is None:
            raise InputError(f"{path}: several subsets and no default in README.md; choose one with --subset: "
                             f"{', '.join(names)}")
    elif subset not in names:
        raise InputError(f"{path}: no subset {subset!r}; subsets found: {', '.join(names)}")
    try:
        builder = datasets.load_dataset_builder(str(path), subset)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path} subset {subset!r}: cannot resolve its files ({type(e).__name__}: {e})") from None
    files = {k: [Path(str(f)) for f in v] for k, v in (builder.config.data_files or {}).items()}
    split = _choose_split(f"{path} subset {subset!r}", list(files), split)
    chosen = [f for f in files[split] if f.suffix == ".parquet"]
    if not chosen:
        raise InputError(f"{path} subset {subset!r} split {split!r}: no parquet files among "
                         f"{', '.join(str(f) for f in files[split])}")
    return subset, split, chosen


def resolve_tables(path: Path, fmt: str, subset: str | None, split: str | None) -> tuple[str, str, list[Path]]:
    """(subset, split, files) of a Hub repository (``fmt`` "hf-hub") or a ``datasets`` cache ("hf-cache")."""
    return (resolve_hub if fmt == "hf-hub" else resolve_cache)(path, subset, split)


def resolve_cache(path: Path, subset: str | None, split: str | None) -> tuple[str, str, list[Path]]:
    """(subset, split, files) of a ``datasets`` cache directory; the subset is the config's directory name."""
    leaves = cache_leaves(path)
    by_config: dict[str, list[Path]] = {}
    for leaf in leaves:
        # <name>/<config>/<version>/<hash>: the config is two levels above the hash
        config = leaf.parent.parent.name if leaf.parent.parent != path.parent else leaf.name
        by_config.setdefault(config, []).append(leaf)
    if subset is None:
        if len(by_config) > 1:
            raise InputError(f"{path}: a datasets cache with several subsets; choose one with --subset: "
                             f"{', '.join(sorted(by_config))}")
        subset = next(iter(by_config))
    elif subset not in by_config:
        raise InputError(f"{path}: no subset {subset!r} in this datasets cache; subsets found: {', '.join(sorted(by_config))}")
    candidates = by_config[subset]
    if len(candidates) > 1:
        raise InputError(f"{path}: subset {subset!r} is prepared more than once here ({', '.join(map(str, candidates))}); "
                         f"point --input at one of them")
    leaf = candidates[0]
    info = json.loads((leaf / "dataset_info.json").read_text(encoding="utf-8"))
    files: dict[str, list[Path]] = {}
    for f in sorted(leaf.glob("*.arrow")):
        m = _SPLIT_FILE.match(f.name)
        if m:
            files.setdefault(m["split"], []).append(f)
    names = list(info.get("splits") or files)
    files = {s: files.get(s, []) for s in names}
    split = _choose_split(f"{leaf}", names, split)
    if not files[split]:
        raise InputError(f"{leaf}: dataset_info.json lists split {split!r} but no {split} .arrow file is there")
    return subset, split, files[split]


def _choose_split(where: str, names: list[str], split: str | None) -> str:
    if split is None:
        if len(names) != 1:
            raise InputError(f"{where}: splits {', '.join(names)}; choose one with --split")
        log.info("%s: building its only split, %r", where, names[0])
        return names[0]
    if split not in names:
        raise InputError(f"{where}: no split {split!r}; splits found: {', '.join(names)}")
    return split


def _batches(f: Path, columns: list[str]) -> Iterator[tuple[str, int, object, Exception | None]]:
    """(where, number of rows, record batch or None, error) per row group of a parquet file or
    record batch of an arrow file; an unreadable parquet row group comes with its error and row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if f.suffix == ".parquet":
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{f}: not a readable parquet file ({e})") from None
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            try:
                yield f"row group {g}", n, pf.read_row_group(g, columns=columns), None
            except (OSError, pa.ArrowException) as e:
                yield f"row group {g}", n, None, e
        return
    try:
        source = pa.memory_map(str(f))
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for b, batch in enumerate(batches):
            # a memory-mapped batch: its pages are the file's, dropped after this batch
            yield f"batch {b}", batch.num_rows, batch.select(columns), None
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{f}: unreadable arrow data ({e}); prepare the dataset again") from None


def schema(f: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if f.suffix == ".parquet":
            return pq.read_schema(f)
        source = pa.memory_map(str(f))
        try:
            return pa.ipc.open_stream(source).schema
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).schema
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{f}: cannot read its schema ({e})") from None


def _audio_kind(f: Path, column: str, typ) -> str:
    import pyarrow as pa

    if pa.types.is_struct(typ) and {typ.field(i).name for i in range(typ.num_fields)} >= {"bytes", "path"}:
        return "struct"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "path"
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return "bytes"
    raise InputError(f"{f}: column {column!r} has type {typ}; expected an Audio struct {{bytes, path}}, "
                     f"a path string or binary audio (name the audio column with --audio-column)")


def _columns(f: Path, text_column: str | None, audio_column: str | None):
    """(schema, audio column, text column, speaker column or None, the other columns) of one table file."""
    sch = schema(f)
    cols = list(sch.names)
    audio_col = pick_column(cols, audio_column, AUDIO_COLUMNS, "audio", str(f))
    text_col = pick_column(cols, text_column, TEXT_COLUMNS, "text", str(f))
    speaker_col = pick_column(cols, None, SPEAKER_COLUMNS, "speaker", str(f), required=False)
    return sch, audio_col, text_col, speaker_col, [c for c in cols if c not in (audio_col, text_col)]


def table_fields(files: list[Path], text_column: str | None, audio_column: str | None) -> set[str]:
    """The metadata fields the files' rows offer (their columns besides audio and text; "speaker" where a
    speaker column is), from the schemas alone: what ``read_tables`` will find, known before any audio is read."""
    fields: set[str] = set()
    for f in files:
        _, _, _, speaker_col, extra = _columns(f, text_column, audio_column)
        fields.update(extra, ["speaker"] if speaker_col else [])
    return fields


def read_tables(files: list[Path], root: Path, label: str, subset: str, split: str, text_column: str | None,
                audio_column: str | None, keep: list[str] | None, spill: Spill, columns_seen: set) -> Iterator:
    """Items and Rejects of the chosen split's files, one row group in memory at a time."""
    num = 0  # rows of the split so far: a key for rows whose audio has no name
    for f in files:
        row_no = 0
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        sch, audio_col, text_col, speaker_col, extra = _columns(f, text_column, audio_column)
        kind = _audio_kind(f, audio_col, sch.field(audio_col).type)
        columns_seen.update(extra)
        if speaker_col:
            columns_seen.add("speaker")
        wanted = [c for c in (extra if keep is None else keep) if c in extra and c not in RESERVED_FIELDS]
        if speaker_col and keep is not None and "speaker" not in keep:
            speaker_col = None
        read_cols = list(dict.fromkeys([audio_col, text_col] + wanted + ([speaker_col] if speaker_col else [])))
        for where_g, n, batch, err in _batches(f, read_cols):
            if err is not None:
                for i in range(n):
                    yield Reject(label, f"{rel} row {row_no + i}", "unreadable_row_group", f"{where_g}: {err}")
                row_no += n
                num += n
                continue
            data = batch.to_pydict()
            del batch
            audios, texts = data.pop(audio_col), data.pop(text_col)
            for i in range(n):
                where = f"{rel} row {row_no}"
                a = audios[i]
                name, blob, path = None, None, None
                if kind == "struct" and a is not None:
                    name, blob = a.get("path"), a.get("bytes")
                    if not blob and name:
                        path = _audio_path(root, f, name)
                elif kind == "path" and a:
                    name, path = a, _audio_path(root, f, a)
                elif kind == "bytes":
                    blob = a
                if not blob and not path:
                    yield Reject(label, where, "missing_audio", f"column {audio_col!r} holds neither bytes nor a path")
                    row_no += 1
                    num += 1
                    continue
                fields = {}
                for c in wanted:
                    v = data[c][i]
                    if v is not None and v != "":
                        fields[c] = _field_value(v)
                if speaker_col and data[speaker_col][i] not in (None, ""):
                    speaker = str(data[speaker_col][i])
                else:
                    speaker = None
                key = make_key(file_stem(name)) if name else make_key(f"{subset}-{split}-{num:09d}")
                yield Item(label, where, key, "" if texts[i] is None else str(texts[i]), audio_path=path,
                           blob=spill.add(blob) if blob else None, speaker=speaker, fields=fields)
                row_no += 1
                num += 1
            spill.flush()
            del data, audios, texts


def _audio_path(root: Path, f: Path, name: str) -> str:
    if os.path.isabs(name):
        return name
    for base in (f.parent, root):
        if (base / name).exists():
            return str(base / name)
    return str(root / name)


def _field_value(v):
    import sys

    if isinstance(v, str):
        return sys.intern(v)  # few distinct values (gender, dialect) repeated over the corpus: one copy each
    if isinstance(v, (bool, int, float)):
        return v
    return json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
