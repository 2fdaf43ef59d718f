"""What the corpus readers make, shared by sources and hub: items, rejects, keys and column names.

  a line, row or utterance of an input ──> Item(key, audio ref, text_raw, speaker, fields)   (kept)
                                       └─> Reject(input, item, reason, detail)            (a line of rejects.tsv)

``InputError``: an input that cannot be read at all. ``make_key`` makes a WebDataset-safe sample key;
``pick_column`` finds the text, audio or speaker column of a table-like input.
"""

from __future__ import annotations

import dataclasses
import re

from ..errors import UserError

# names the sample JSON already uses; an input column of one of these names is not carried
RESERVED_FIELDS = frozenset(("text", "text_raw", "duration", "num_samples", "source", "id", "audio_sha256"))
TEXT_COLUMNS = ("transcription", "text", "sentence", "transcript", "normalized_text")
AUDIO_COLUMNS = ("audio", "path", "file")
SPEAKER_COLUMNS = ("speaker_id", "speaker", "client_id")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


class InputError(UserError):
    """An input that cannot be read at all; the message says what to change."""


@dataclasses.dataclass
class Reject:
    input: str
    item: str
    reason: str
    detail: str = ""

    def tsv_row(self) -> str:
        clean = [str(v).replace("\t", " ").replace("\n", " ") for v in (self.input, self.item, self.reason, self.detail)]
        return "\t".join(clean) + "\n"


@dataclasses.dataclass
class Item:
    input: str  # the --input it came from
    item: str  # where in that input: "line 12", "row 3", an utterance id
    key: str
    text_raw: str
    audio_path: str | None = None  # a file
    command: str | None = None  # a Kaldi wav.scp command whose stdout is the audio (--allow-commands)
    dataset: tuple | None = None  # (dataset dir, split, row, audio column) for save_to_disk inputs
    offset: float = 0.0
    duration: float | None = None
    speaker: str | None = None
    blob: tuple | None = None  # (spill file, offset, size): audio bytes copied out of a parquet/arrow table
    fields: dict = dataclasses.field(default_factory=dict)  # metadata kept in the sample's JSON
    text: str = ""  # normalised, filled in by the builder

    def metadata(self) -> dict:
        """The fields for the sample's JSON: the speaker (where the input names one) and the kept fields."""
        out = {"speaker": self.speaker} if self.speaker is not None else {}
        out.update(self.fields)
        return out


def make_key(name: str) -> str:
    """A WebDataset-safe sample key: no dots (WebDataset splits on the first one), no slashes, no
    leading underscore. Characters outside [A-Za-z0-9_-] become "_"."""
    key = _KEY_BAD.sub("_", name).lstrip("_")
    return key or "utt"


def file_stem(path: str) -> str:
    """A path's file name without its last suffix ("a/b/x.wav" -> "x")."""
    p = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return p.rsplit(".", 1)[0] if "." in p else p


def pick_column(columns, wanted: str | None, candidates: tuple[str, ...], what: str, where: str, required=True) -> str | None:
    """The column named ``wanted`` (it must exist), else the first of ``candidates`` present; InputError saying
    what was found when there is none and the column is ``required``."""
    if wanted:
        if wanted not in columns:
            raise InputError(f"{where}: no {what} column {wanted!r}; columns found: {', '.join(columns)}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise InputError(
            f"{where}: no {what} column; expected one of {', '.join(candidates)} (or name it with "
            f"--{what}-column); columns found: {', '.join(columns) or '(none)'}"
        )
    return None
