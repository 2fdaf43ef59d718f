import pytest

from asr_dist.text import (
    Normalizer,
    TextReject,
    build_vocab,
    char_inventory,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Det regner i København i dag.", "det regner i københavn i dag"),
        ("  Hvad   hedder du,\tog hvor kommer du fra?  ", "hvad hedder du og hvor kommer du fra"),
        ("Tog nummer 21 kører fra spor 3.", "tog nummer enogtyve kører fra spor tre"),
        ("Prisen er 3,5 kroner", "prisen er tre komma fem kroner"),
        ("Café-ejeren sagde \"it's fine\"", "cafe ejeren sagde its fine"),
        ("Smörrebröd og Kräfte", "smørrebrød og kræfte"),
        ("ja <ee> det tror <mm> jeg <qq>", "ja eee det tror mmm jeg qqq"),
        ("ﬁn ＡＢＣ", "fin abc"),  # NFKC: ligature and full-width letters
        ("hej <music> med dig", "hej med dig"),
    ],
)
def test_danish_default(raw, expected):
    assert Normalizer("danish")(raw) == expected


def test_danish_options():
    assert Normalizer("danish", hesitations="drop")("ja <ee> nej") == "ja nej"
    assert Normalizer("danish", digits="keep")("spor 3") == "spor 3"
    with pytest.raises(TextReject) as e:
        Normalizer("danish", digits="reject")("spor 3")
    assert e.value.reason == "digits"
    with pytest.raises(TextReject) as e:
        Normalizer("danish")("det var <inaudible> sagde han")
    assert e.value.reason == "inaudible"
    assert Normalizer("danish", inaudible="keep")("det var <inaudible> sagde han") == "det var sagde han"
    with pytest.raises(TextReject) as e:
        Normalizer("danish", fold_accents=False)("café")
    assert e.value.reason == "foreign_chars" and "é" in e.value.detail


def test_rejects_and_errors():
    for name in Normalizer.NAMES:
        with pytest.raises(TextReject) as e:
            Normalizer(name)(" ?! ... " if name != "none" else "   ")
        assert e.value.reason == "empty_text"
    with pytest.raises(TextReject) as e:
        Normalizer("danish")("привет мир")
    assert e.value.reason == "foreign_chars"
    with pytest.raises(ValueError, match="digits"):
        Normalizer("danish", digits="words")
    with pytest.raises(ValueError, match="unknown setting"):
        Normalizer("danish", digit="spell")
    with pytest.raises(ValueError, match="unknown text normaliser"):
        Normalizer("german")


def test_basic_and_none():
    assert Normalizer("basic")("Hello, World! 42 Ölé") == "hello world 42 ölé"
    assert Normalizer("none")("  Keep, This!\n ") == "Keep, This!"


def test_description_round_trip():
    n = Normalizer("danish", digits="keep")
    assert Normalizer.from_description(n.describe()).describe() == n.describe()
    assert n.describe() == {"name": "danish", "settings": {"hesitations": "words", "inaudible": "drop",
                                                           "digits": "keep", "fold_accents": True}}


def test_vocab_works_with_wav2vec2_tokenizer(tmp_path):
    import transformers  # a hard dependency: missing, the test fails rather than skips
    texts = ["det regner i københavn", "æbler og pærer", "hvad så"]
    vocab = build_vocab(char_inventory(texts))
    assert vocab["[PAD]"] == 0 and vocab["[UNK]"] == 1 and vocab["|"] == 2
    assert sorted(vocab.values()) == list(range(len(vocab)))
    path = tmp_path / "vocab.json"
    path.write_text(__import__("json").dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tok = transformers.Wav2Vec2CTCTokenizer(str(path), unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|")
    for t in texts:
        ids = tok(t).input_ids
        assert vocab["[UNK]"] not in ids
        assert tok.decode(ids, group_tokens=False) == t
    assert tok.pad_token_id == 0
