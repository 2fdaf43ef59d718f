"""Greedy CTC decoding and exact, summable error counts.

WER = sum of word edits / sum of reference words, summed over every utterance on every rank
(never an average of per-rank or per-batch rates). Counts come from jiwer, per batch.
"""

from __future__ import annotations

import dataclasses

import jiwer
import torch

from .text import PAD_TOKEN, WORD_DELIMITER


class GreedyDecoder:
    """CTC argmax path -> text: collapse repeats, drop the blank ([PAD]), "|" -> space."""

    def __init__(self, vocab: dict[str, int]):
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.blank = vocab[PAD_TOKEN]

    def __call__(self, logits: torch.Tensor, frame_lengths: torch.Tensor) -> list[str]:
        """logits (B, F, V), frame_lengths (B,) -> B transcripts."""
        ids = logits.argmax(dim=-1).cpu()  # note: a device-to-host sync point
        out = []
        for row, n in zip(ids.tolist(), frame_lengths.tolist()):
            chars, prev = [], None
            for i in row[:n]:
                if i != prev and i != self.blank:
                    tok = self.id_to_token.get(i, "")
                    chars.append(" " if tok == WORD_DELIMITER else (tok if len(tok) == 1 else ""))
                prev = i
            out.append(" ".join("".join(chars).split()))
        return out


@dataclasses.dataclass
class ErrorCounts:
    """Summable edit counts; ``as_tensor``/``from_tensor`` carry them through an all-reduce."""

    word_edits: int = 0
    ref_words: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    char_edits: int = 0
    ref_chars: int = 0
    utterances: int = 0

    def add(self, refs: list[str], hyps: list[str]) -> None:
        if not refs:
            return
        w = jiwer.process_words(refs, hyps)
        c = jiwer.process_characters(refs, hyps)
        self.substitutions += w.substitutions
        self.deletions += w.deletions
        self.insertions += w.insertions
        self.word_edits += w.substitutions + w.deletions + w.insertions
        self.ref_words += w.substitutions + w.deletions + w.hits
        self.char_edits += c.substitutions + c.deletions + c.insertions
        self.ref_chars += c.substitutions + c.deletions + c.hits
        self.utterances += len(refs)

    @property
    def wer(self) -> float:
        return self.word_edits / self.ref_words if self.ref_words else 0.0

    @property
    def cer(self) -> float:
        return self.char_edits / self.ref_chars if self.ref_chars else 0.0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f.name) for f in dataclasses.fields(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ErrorCounts":
        return cls(*(int(round(v)) for v in t.tolist()))
