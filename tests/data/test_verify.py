"""`shards verify` finds damage and names the shard and sample; `shards info` describes a set."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from asr_dist.cli import main
from asr_dist.data import index as fmt
from asr_dist.data.verify import info, verify
from asr_dist.data.writer import BuildOptions, build


@pytest.fixture(scope="module")
def good_set(tmp_path_factory, corpus_cache):
    out = tmp_path_factory.mktemp("good") / "shards"
    build(BuildOptions(inputs=[corpus_cache("commonvoice", num=12)], output=str(out), shard_size=5, progress=False))
    return out


@pytest.fixture
def shard_set(good_set, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(good_set, d)
    return d


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as t:
        return t.getmembers()


def test_a_sound_set_passes(shard_set, capsys):
    assert verify(str(shard_set), progress=False) == []
    assert main(["shards", "verify", str(shard_set), "--no-progress"]) == 0


def test_truncated_tar_is_named(shard_set, capsys):
    shard = shard_set / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    problems = verify(str(shard_set), progress=False)
    assert any(p.startswith("shard-000001.tar: checksum differs") for p in problems)
    assert any(p.startswith("shard-000001.tar:") and "samples read, index.json says 5" in p for p in problems)
    assert not any(p.startswith("shard-000000.tar") for p in problems)
    assert main(["shards", "verify", str(shard_set), "--no-progress"]) == 1
    assert "shard-000001.tar" in capsys.readouterr().out


def test_flipped_byte_in_flac_payload_names_the_sample(shard_set, capsys):
    shard = shard_set / "shard-000002.tar"
    flac = next(m for m in members(shard) if m.name.endswith(".flac"))
    data = bytearray(shard.read_bytes())
    pos = flac.offset_data + flac.size // 2  # the middle of the audio frames, past all headers
    data[pos] ^= 0x10
    shard.write_bytes(bytes(data))
    problems = verify(str(shard_set), progress=False)
    key = flac.name.split(".")[0]
    assert any(p.startswith(f"shard-000002.tar sample {key}:") for p in problems), problems
    assert main(["shards", "verify", str(shard_set), "--no-progress"]) == 1


def test_edited_transcript_outside_vocab_is_named(shard_set):
    vocab = json.loads((shard_set / "vocab.json").read_text())
    del vocab["k"]
    (shard_set / "vocab.json").write_text(json.dumps(vocab))
    problems = verify(str(shard_set), progress=False)
    assert any("vocab.json: does not match" in p for p in problems)
    assert any("transcript characters not in vocab.json: 'k'" in p for p in problems)


def test_missing_set_and_interrupted_build_are_clear(tmp_path, capsys):
    assert main(["shards", "verify", str(tmp_path / "none")]) == 2
    assert "no such shard directory" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / fmt.STATE_NAME).write_text("{}")
    assert main(["shards", "info", str(tmp_path / "half")]) == 2
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "nested"])
def test_reader_refuses_unsafe_members(tmp_path, kind):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as t:
        if kind == "symlink":
            ti = tarfile.TarInfo("a.flac")
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(ti)
        else:
            name = {"parent": "../a.json", "absolute": "/tmp/a.json", "nested": "x/a.json"}[kind]
            ti = tarfile.TarInfo(name)
            ti.size = 2
            t.addfile(ti, io.BytesIO(b"{}"))
    with pytest.raises(fmt.ShardError):
        list(fmt.iter_shard(path))


def test_info_describes_the_set(good_set, capsys):
    text = info(str(good_set))
    assert "12 utterances" in text and "3 shards of 5 (the last is short)" in text
    assert "duration histogram" in text and "danish" in text and "e:" in text
    assert main(["shards", "info", str(good_set)]) == 0
