"""Hugging Face dataset repositories (parquet, the card's configs), datasets caches (arrow) and Common
Voice release directories as builder inputs, with the metadata fields each sample carries."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_dist.cli import main
from asr_dist.data import index as fmt
from asr_dist.data.items import InputError
from asr_dist.data.sources import resolve_input
from asr_dist.data.verify import info, verify
from asr_dist.data.writer import build

from test_writer import opts, read_set, rejects


def num_samples_16k(n: int, sr: int) -> int:
    """Length of soxr's output for ``n`` samples at ``sr`` (it rounds half up)."""
    return n if sr == 16000 else (2 * n * 16000 + sr) // (2 * sr)


def hub_rows(repo: Path, pattern: str) -> list[dict]:
    rows = []
    for f in sorted(repo.glob(pattern)):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def test_hub_repo_default_subset_split_train(corpus, tmp_path):
    repo = Path(corpus("hf-hub", num=16))
    s = build(opts(repo, tmp_path / "out", split="train"))
    rows = hub_rows(repo, "data/train-*.parquet")
    assert (s.num_kept, s.num_rejected) == (len(rows), 0) == (12, 0)
    assert verify(str(tmp_path / "out"), progress=False) == []
    samples = read_set(tmp_path / "out")
    codecs = Counter()
    for row in rows:
        key = Path(row["audio"]["path"]).stem
        meta, audio, sr = samples[key]
        info_ = sf.info(io.BytesIO(row["audio"]["bytes"]))
        codecs[(info_.format, info_.samplerate)] += 1
        # decoded by soundfile at the row's own rate and resampled to 16 kHz
        assert sr == 16000 and meta["num_samples"] == len(audio) == num_samples_16k(info_.frames, info_.samplerate)
        assert meta["text_raw"] == row["text"]
        assert meta["speaker"] == meta["speaker_id"] == row["speaker_id"]
        assert meta["age"] == row["age"] and meta["dialect"] == row["dialect"]
        assert meta.get("gender") == row["gender"]  # a null value is left out
        assert meta["id"].startswith("data/train-0000")
    assert {f for f, _ in codecs} == {"FLAC", "WAV", "MP3"} and len(codecs) == 6
    index = fmt.read_index(tmp_path / "out")
    assert index["inputs"][0]["format"] == "hf-hub" and index["inputs"][0]["split"] == "train"
    assert index["inputs"][0]["subset"] == "default"
    gender = Counter(r["gender"] for r in rows if r["gender"])
    assert index["fields"]["gender"] == {"num_samples": sum(gender.values()), "num_values": len(gender),
                                         "counts": dict(sorted(gender.items(), key=lambda kv: (-kv[1], kv[0])))}
    assert index["fields"]["age"]["counts"] == {str(k): v for k, v in Counter(r["age"] for r in rows).items()}
    assert not list((tmp_path / "out").glob(".spill-*")), "the audio spill is removed after the build"


def test_hub_subsets_and_splits(corpus, tmp_path, capsys):
    repo = Path(corpus("hf-hub", num=8))
    with pytest.raises(InputError, match=r"splits train, test; choose one with --split"):
        resolve_input(str(repo), None)
    with pytest.raises(InputError, match=r"no split 'dev'; splits found: train, test"):
        resolve_input(str(repo), None, split="dev")
    with pytest.raises(InputError, match=r"no subset 'nst'; subsets found: default, extra"):
        resolve_input(str(repo), None, subset="nst")
    spec = resolve_input(str(repo), None, subset="extra")  # one split: taken, and said so
    assert (spec.format, spec.subset, spec.split) == ("hf-hub", "extra", "train")
    assert main(["shards", "build", "-i", str(repo), "--subset", "extra", "-o", str(tmp_path / "x"), "-j", "1",
                 "--no-progress"]) == 0
    assert len(read_set(tmp_path / "x")) == 3
    assert main(["shards", "build", "-i", str(repo), "--split", "test", "-o", str(tmp_path / "t"), "-j", "2",
                 "--no-progress"]) == 0
    assert len(read_set(tmp_path / "t")) == 2
    assert main(["shards", "build", "-i", str(repo), "--split", "validation", "-o", str(tmp_path / "v"),
                 "--no-progress"]) == 2
    assert "no split 'validation'" in capsys.readouterr().err


def test_datasets_cache_gives_the_same_samples(corpus, tmp_path):
    datasets = pytest.importorskip("datasets")
    repo = Path(corpus("hf-hub", num=8))
    datasets.load_dataset(str(repo), cache_dir=str(tmp_path / "cache"))  # prepares arrow files, decodes nothing
    spec = resolve_input(str(tmp_path / "cache"), None, split="train")
    assert (spec.format, spec.subset) == ("hf-cache", "default")
    build(opts(tmp_path / "cache", tmp_path / "from-cache", split="train"))
    build(opts(repo, tmp_path / "from-repo", split="train"))
    a, b = read_set(tmp_path / "from-cache"), read_set(tmp_path / "from-repo")
    assert sorted(a) == sorted(b) and len(a) == 6
    strip = ("source", "id")
    assert all({k: v for k, v in a[k][0].items() if k not in strip} == {k: v for k, v in b[k][0].items() if k not in strip}
               for k in a)


def _table(tmp_path, columns: dict, name="data/train-00000-of-00001.parquet", row_group_size=None) -> Path:
    repo = tmp_path / "repo"
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), repo / name, row_group_size=row_group_size)
    return repo


def _flac(seconds=1.0, rate=16000) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(np.arange(int(seconds * rate)) * 0.07), rate, format="FLAC")
    return buf.getvalue()


def test_parquet_without_audio_or_with_a_wrong_audio_type(tmp_path):
    repo = _table(tmp_path, {"text": ["hej"], "sound": [b"x"]})
    with pytest.raises(InputError, match=r"train-00000-of-00001.parquet: no audio column; expected one of audio.*"
                                         r"columns found: text, sound"):
        build(opts(repo, tmp_path / "out"))
    repo = _table(tmp_path, {"text": ["hej"], "audio": [3]})
    with pytest.raises(InputError, match=r"train-00000-of-00001.parquet: column 'audio' has type int64; expected an Audio struct"):
        build(opts(repo, tmp_path / "out"))
    with pytest.raises(InputError, match=r"no text column"):
        build(opts(_table(tmp_path, {"audio": [_flac()]}), tmp_path / "out"))


def test_unreadable_row_group_rejects_its_rows(tmp_path):
    audio = [{"bytes": _flac(), "path": f"u{i}.flac"} for i in range(6)]
    repo = _table(tmp_path, {"audio": audio, "text": ["hej med dig"] * 6}, row_group_size=2)
    f = repo / "data/train-00000-of-00001.parquet"
    md = pq.ParquetFile(f).metadata
    data = bytearray(f.read_bytes())
    off = md.row_group(1).column(0).data_page_offset
    data[off:off + 64] = b"\xff" * 64  # the page header of row group 1's audio bytes
    f.write_bytes(bytes(data))
    s = build(opts(repo, tmp_path / "out", max_reject_fraction=0.5))
    assert (s.num_kept, s.num_rejected) == (4, 2)
    bad = rejects(tmp_path / "out")
    assert [(r["item"], r["reason"]) for r in bad] == [
        ("data/train-00000-of-00001.parquet row 2", "unreadable_row_group"),
        ("data/train-00000-of-00001.parquet row 3", "unreadable_row_group"),
    ]
    assert bad[0]["detail"].startswith("row group 1: ")
    assert sorted(read_set(tmp_path / "out")) == ["u0", "u1", "u4", "u5"]


def test_audio_as_paths_and_rows_without_audio(tmp_path):
    repo = tmp_path / "repo"
    (repo / "audio").mkdir(parents=True)
    (repo / "audio" / "a.flac").write_bytes(_flac())
    repo = _table(tmp_path, {"audio": [{"bytes": None, "path": "audio/a.flac"}, {"bytes": None, "path": None}],
                             "sentence": ["hej", "med"]})
    s = build(opts(repo, tmp_path / "out", max_reject_fraction=0.5))
    assert (s.num_kept, s.num_rejected) == (1, 1)
    assert rejects(tmp_path / "out")[0]["reason"] == "missing_audio"
    assert list(read_set(tmp_path / "out")) == ["a"]


def test_commonvoice_release_directory(corpus, tmp_path, capsys):
    lang = Path(corpus("commonvoice-release", num=10, audio_format="mp3", sample_rate=48000))
    with pytest.raises(InputError, match=r"splits train, dev, test, validated, other; choose one with --split"):
        resolve_input(str(lang), None)
    with pytest.raises(InputError, match=r"no split 'valid' \(valid.tsv\)"):
        resolve_input(str(lang), None, split="valid")
    s = build(opts(lang, tmp_path / "train", split="train"))
    assert (s.num_kept, s.num_rejected) == (6, 0)
    rows = [line.split("\t") for line in (lang / "train.tsv").read_text(encoding="utf-8").splitlines()]
    header, rows = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
    samples = read_set(tmp_path / "train")
    for r in rows:
        meta = samples[Path(r["path"]).stem][0]
        want = {"speaker": r["client_id"], "age": r["age"], "gender": r["gender"], "accents": r["accents"]}
        assert {k: meta.get(k) for k in want} == {k: v or None for k, v in want.items()}
        assert "up_votes" not in meta and "locale" not in meta  # not among the defaults
    index = fmt.read_index(tmp_path / "train")
    assert set(index["fields"]) == {"speaker", "age", "gender", "accents"}
    assert index["fields"]["speaker"]["num_samples"] == 6
    assert main(["shards", "build", "-i", str(lang), "--split", "dev", "--keep-fields", "gender,locale",
                 "-o", str(tmp_path / "dev"), "--no-progress", "-j", "1"]) == 0
    dev = read_set(tmp_path / "dev")
    assert len(dev) == 2 and all(set(m) & {"gender", "locale", "speaker", "age"} == {"gender", "locale"}
                                 for m, _, _ in dev.values())
    capsys.readouterr()
    assert main(["shards", "info", str(tmp_path / "dev")]) == 0
    out = capsys.readouterr().out
    assert "metadata fields" in out and "locale: 2 samples, 1 values: da:2" in out


def test_keep_fields_errors(corpus, tmp_path):
    src = corpus("commonvoice", num=3)
    with pytest.raises(InputError, match=r"--keep-fields dialect: no input has this field; fields found: .*client_id"):
        build(opts(src, tmp_path / "out", keep_fields=["speaker", "dialect"]))
    with pytest.raises(InputError, match=r"--keep-fields duration: the sample JSON already has this field"):
        build(opts(src, tmp_path / "out", keep_fields=["duration"]))
    assert not (tmp_path / "out" / "index.json").exists()
    # a parquet input's fields are read from its schemas: the error comes before any audio is spilled
    repo = corpus("hf-hub", num=8)
    with pytest.raises(InputError, match=r"--keep-fields dialekt: no input has this field; fields found: .*dialect"):
        build(opts(repo, tmp_path / "hub", split="train", keep_fields=["speaker", "dialekt"]))
    assert not (tmp_path / "hub").exists()


def test_kaldi_and_nemo_default_fields(corpus, tmp_path):
    kaldi = Path(corpus("kaldi", num=4))
    (kaldi / "spk2gender").write_text("".join(f"spk{i} {'fm'[i % 2]}\n" for i in range(4)))
    build(opts(kaldi, tmp_path / "k"))
    got = {m["speaker"]: m["gender"] for m, _, _ in read_set(tmp_path / "k").values()}
    assert got == {f"spk{i}": "fm"[i % 2] for i in range(4)}
    assert fmt.read_index(tmp_path / "k")["fields"]["gender"]["counts"] == {"f": 2, "m": 2}

    nemo = Path(corpus("nemo", num=3))
    lines = [json.loads(x) for x in nemo.read_text(encoding="utf-8").splitlines()]
    for i, e in enumerate(lines):
        e.update(speaker=f"s{i}", dialect="Fynsk", snr=12.5)
    nemo.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in lines), encoding="utf-8")
    build(opts(nemo, tmp_path / "n"))
    metas = [m for m, _, _ in read_set(tmp_path / "n").values()]
    assert all(m["dialect"] == "Fynsk" and m["snr"] == 12.5 and m["speaker"].startswith("s") for m in metas)
    text = info(str(tmp_path / "n"))
    assert "dialect: 3 samples, 1 values: Fynsk:3" in text and "speaker: 3 samples, 3 values" in text
