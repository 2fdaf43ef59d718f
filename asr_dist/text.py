"""Transcript normalisation and the CTC character vocabulary.

raw transcript ──> Normalizer(name, settings) ──> normalised text | TextReject(reason, detail)
kept transcripts ──> build_vocab ──> vocab.json for transformers' Wav2Vec2CTCTokenizer

Normalisers are named and their settings are recorded in index.json, so evaluation can normalise
references exactly the way the training data was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
from collections import Counter
from typing import Iterable

from .errors import InvalidValue, PathNotFound

PAD_TOKEN = "[PAD]"  # id 0; transformers' *ForCTC models use the pad id as the CTC blank
UNK_TOKEN = "[UNK]"
WORD_DELIMITER = "|"

DANISH_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzæøå")
# letters that are spelling variants of Danish ones (Swedish/German loans), mapped before the
# generic accent folding so that "ö" becomes "ø" rather than "o"
_DANISH_VARIANTS = {"ö": "ø", "ä": "æ", "ǿ": "ø"}
_HESITATIONS = {"<ee>": "eee", "<mm>": "mmm", "<qq>": "qqq"}
_INAUDIBLE = "<inaudible>"
_TAG = re.compile(r"<[a-zæøå]+>")
_DIGITS = re.compile(r"\d+")
_DECIMAL = re.compile(r"(\d),(\d)")  # Danish decimal comma: 3,5 -> 3 komma 5
_SPACES = re.compile(r"\s+")
# apostrophes join (it's -> its); every other punctuation or symbol separates words
_APOSTROPHES = "'’`´ʼ"


class TextReject(Exception):
    """A transcript that a normaliser refuses; ``reason`` is a short code for rejects.tsv."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class DanishSettings:
    """Settings of the ``danish`` normaliser (NPSC / NST conventions)."""

    hesitations: str = "words"  # words: <ee> <mm> <qq> -> eee mmm qqq; drop: remove the tags
    inaudible: str = "drop"  # drop: reject utterances containing <inaudible>; keep: remove the tag, keep the rest
    digits: str = "spell"  # spell: 21 -> enogtyve; keep: leave digits; reject: reject the utterance
    fold_accents: bool = True  # é -> e, ü -> u, ö -> ø, ä -> æ; other foreign letters reject the utterance

    def __post_init__(self):
        _check_choice("hesitations", self.hesitations, ("words", "drop"))
        _check_choice("inaudible", self.inaudible, ("drop", "keep"))
        _check_choice("digits", self.digits, ("spell", "keep", "reject"))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidValue(f"text normaliser setting {name}={value!r} is not one of {', '.join(choices)}")


def _drop_punctuation(text: str) -> str:
    out = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        cat = unicodedata.category(ch)
        out.append(" " if cat[0] in "PSZC" else ch)
    return "".join(out)


def _fold_accent(ch: str) -> str:
    ch = _DANISH_VARIANTS.get(ch, ch)
    if ch in DANISH_ALPHABET:
        return ch
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return base if base and all(c in DANISH_ALPHABET for c in base) else ch


def _spell_number(match: re.Match) -> str:
    from num2words import num2words

    return " " + num2words(int(match.group()), lang="da") + " "


class Normalizer:
    """A named transcript normaliser: ``danish`` (default), ``basic`` or ``none``."""

    NAMES = ("danish", "basic", "none")

    def __init__(self, name: str = "danish", **settings):
        if name not in self.NAMES:
            raise InvalidValue(f"unknown text normaliser {name!r}; choose one of {', '.join(self.NAMES)}")
        if name == "danish":
            fields = {f.name for f in dataclasses.fields(DanishSettings)}
            unknown = set(settings) - fields
            if unknown:
                raise InvalidValue(
                    f"unknown setting(s) {sorted(unknown)} for the danish normaliser; valid: {sorted(fields)}"
                )
            self.settings = DanishSettings(**settings)
        elif settings:
            raise InvalidValue(f"the {name} normaliser takes no settings (got {sorted(settings)})")
        else:
            self.settings = None
        self.name = name

    def describe(self) -> dict:
        """Name and settings, as recorded in index.json."""
        return {"name": self.name, "settings": dataclasses.asdict(self.settings) if self.settings else {}}

    @classmethod
    def from_description(cls, desc: dict) -> "Normalizer":
        return cls(desc["name"], **desc.get("settings", {}))

    def __call__(self, text: str) -> str:
        """Normalise one transcript; raises TextReject when the utterance should not be used."""
        if self.name == "none":
            out = _SPACES.sub(" ", text).strip()
        elif self.name == "basic":
            out = _SPACES.sub(" ", _drop_punctuation(unicodedata.normalize("NFKC", text).lower())).strip()
        else:
            out = self._danish(text)
        if not out:
            raise TextReject("empty_text", "transcript is empty after normalisation")
        return out

    def _danish(self, text: str) -> str:
        s: DanishSettings = self.settings
        text = unicodedata.normalize("NFKC", text).lower()
        if _INAUDIBLE in text:
            if s.inaudible == "drop":
                raise TextReject("inaudible", "transcript contains <inaudible>")
            text = text.replace(_INAUDIBLE, " ")
        for tag, word in _HESITATIONS.items():
            text = text.replace(tag, f" {word} " if s.hesitations == "words" else " ")
        text = _TAG.sub(" ", text)  # any other markup tag (<music>, <noise>, …) is not speech
        if _DIGITS.search(text):
            if s.digits == "reject":
                raise TextReject("digits", "transcript contains digits (digits=reject)")
            if s.digits == "spell":
                text = _DIGITS.sub(_spell_number, _DECIMAL.sub(r"\1 komma \2", text))
        text = _drop_punctuation(text)
        if s.fold_accents:
            text = "".join(_fold_accent(c) for c in text)
        foreign = sorted({c for c in text if c.isalpha() and c not in DANISH_ALPHABET})
        if foreign:
            raise TextReject("foreign_chars", "letters outside the Danish alphabet: " + "".join(foreign))
        return _SPACES.sub(" ", text).strip()


def build_vocab(char_counts: Counter | dict) -> dict[str, int]:
    """The CTC vocabulary: [PAD]=0 (blank), [UNK]=1, "|"=2, then the characters in sorted order."""
    chars = sorted(c for c in char_counts if c != " " and c != WORD_DELIMITER)
    vocab = {PAD_TOKEN: 0, UNK_TOKEN: 1, WORD_DELIMITER: 2}
    for c in chars:
        vocab[c] = len(vocab)
    return vocab


def vocab_chars(vocab: dict[str, int]) -> set[str]:
    """The transcript characters a vocabulary covers (the delimiter stands for a space)."""
    chars = {c for c in vocab if len(c) == 1 and c != WORD_DELIMITER}
    if WORD_DELIMITER in vocab:
        chars.add(" ")
    return chars


def load_vocab(path) -> dict[str, int]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PathNotFound(f"{path}: no such vocabulary file") from None
    return vocab_from_bytes(data, path)


def vocab_from_bytes(data: bytes, where) -> dict[str, int]:
    """A vocab.json's content, checked; ``where`` names it in errors."""
    try:
        vocab = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors; RecursionError: absurdly deep nesting
        raise InvalidValue(f"{where}: not a JSON vocabulary ({str(e)[:200] or type(e).__name__})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise InvalidValue(f"{where}: a vocabulary must be a JSON object of token -> integer id")
    for token in (PAD_TOKEN, UNK_TOKEN, WORD_DELIMITER):
        if token not in vocab:
            raise InvalidValue(f"{where}: the vocabulary lacks {token!r}, which Wav2Vec2CTCTokenizer needs")
    return vocab


def vocab_json_bytes(vocab: dict[str, int]) -> bytes:
    return (json.dumps(vocab, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def vocab_hash(vocab: dict[str, int]) -> str:
    return hashlib.sha256(vocab_json_bytes(vocab)).hexdigest()


def char_inventory(texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for t in texts:
        counts.update(t)
    return counts
