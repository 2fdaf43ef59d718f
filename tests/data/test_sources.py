"""Corpus readers: layout detection, fields, and every malformed line accounted for."""

from __future__ import annotations

import json

import pytest

from asr_dist.data.items import InputError, Item, Reject, make_key
from asr_dist.data.sources import read_input, resolve_input


def read(path, **kw):
    out = list(read_input(resolve_input(str(path), kw.pop("fmt", None)), **kw))
    return [x for x in out if isinstance(x, Item)], [x for x in out if isinstance(x, Reject)]


def test_make_key():
    assert make_key("common_voice_da_1.mp3") == "common_voice_da_1_mp3"
    assert make_key("__a.b/c d") == "a_b_c_d"
    assert make_key("...") == "utt"


def test_detection_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="cannot tell the layout"):
        resolve_input(str(tmp_path / "notes.txt"), None)
    with pytest.raises(InputError, match="wav.scp"):
        resolve_input(str(tmp_path), None)
    with pytest.raises(InputError, match="unknown input format"):
        resolve_input(str(tmp_path / "notes.txt"), "sphinx")


def test_nemo_lines(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(
        b'{"audio_filepath": "a/x.wav", "text": "hej", "duration": 1.5}\n'
        b"\n"
        b"not json\n"
        b'{"audio_filepath": "y.wav"}\n'
        b'{"audio_filepath": "/abs/y.wav", "text": "\xff"}\n'
        b'{"audio_filepath": "long.wav", "text": "a", "offset": 2.5, "duration": 1.0, "speaker": 4}\n'
        b'{"audio_filepath": "long.wav", "text": "b", "offset": 0, "duration": 2.5}\n'
    )
    items, rejects = read(m)
    assert [(i.key, i.audio_path, i.offset, i.duration) for i in items] == [
        ("x", str(tmp_path / "a" / "x.wav"), 0.0, None),
        ("long-000002500", str(tmp_path / "long.wav"), 2.5, 1.0),
        ("long", str(tmp_path / "long.wav"), 0.0, 2.5),
    ]
    assert items[1].speaker == "4"
    assert [(r.item, r.reason) for r in rejects] == [
        ("m.jsonl line 3", "bad_line"), ("m.jsonl line 4", "bad_line"), ("m.jsonl line 5", "bad_encoding"),
    ]
    assert "found: audio_filepath" in rejects[1].detail


def test_audiofolder_jsonl_and_nested(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.wav", "sentence": "hej"}) + "\n[1]\n")
    (tmp_path / "a" / "metadata.csv").write_text('file_name,sentence,speaker_id\nx.wav,"hej, du",s1\ny.wav,x\n')
    items, rejects = read(tmp_path)
    assert sorted((i.key, i.text_raw, i.speaker) for i in items) == [("a_x", "hej, du", "s1"), ("x", "hej", None)]
    assert sorted(r.reason for r in rejects) == ["bad_line", "bad_line"]


def test_commonvoice_audio_beside_tsv(tmp_path):
    (tmp_path / "t.tsv").write_text("path\tsentence\nx.mp3\thej\n")
    items, _ = read(tmp_path / "t.tsv")
    assert items[0].audio_path == str(tmp_path / "x.mp3") and items[0].key == "x"


def test_kaldi_requires_text(tmp_path):
    (tmp_path / "wav.scp").write_text("a a.wav\n")
    with pytest.raises(InputError, match="needs 'text'"):
        read(tmp_path)
