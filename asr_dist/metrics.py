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


NO_VALUE = "(none)"  # the group of utterances without a value for the field, so groups sum to the whole


def utterance_counts(ref: str, hyp: str) -> ErrorCounts:
    """One utterance's counts (what a group or a bootstrap resample sums)."""
    c = ErrorCounts()
    c.add([ref], [hyp])
    return c


def group_key(value) -> str:
    """The group an utterance's value of a field puts it in (None or "": ``NO_VALUE``)."""
    return NO_VALUE if value is None or value == "" else str(value)


class GroupTable:
    """Summable counts per group of one or more metadata fields, in one tensor that every rank lays
    out alike, so that a single all-reduce (SUM) gives the exact counts of every group.

    ``values``: {utterance key: {field: value}} for every utterance of the set (all ranks hold all
    of it). Rows: each field's groups in sorted order, one after the other; columns: ErrorCounts'
    fields. Every utterance counts in exactly one row per field, so each field's rows sum to the set."""

    def __init__(self, fields: list[str], values: dict[str, dict]):
        self.fields = list(fields)
        self.groups = {f: sorted({group_key(v.get(f)) for v in values.values()}) for f in self.fields}
        first, offsets = 0, {}
        for f in self.fields:
            offsets[f] = first
            first += len(self.groups[f])
        self.num_rows = first
        index = {f: {g: offsets[f] + i for i, g in enumerate(gs)} for f, gs in self.groups.items()}
        self.rows = {key: [index[f][group_key(v.get(f))] for f in self.fields] for key, v in values.items()}

    def zeros(self) -> torch.Tensor:
        """(groups, counts) float64: integers stay exact in a float64 all-reduce up to 2**53."""
        return torch.zeros(self.num_rows, len(dataclasses.fields(ErrorCounts)), dtype=torch.float64)

    def add(self, table: torch.Tensor, key: str, counts: ErrorCounts) -> None:
        """Adds one utterance's counts to its group in every field."""
        table[self.rows[key]] += counts.as_tensor()

    def counts(self, table: torch.Tensor) -> dict[str, dict[str, ErrorCounts]]:
        """{field: {group: ErrorCounts}} of a (reduced) table."""
        out, row = {}, 0
        for f in self.fields:
            out[f] = {}
            for g in self.groups[f]:
                out[f][g] = ErrorCounts.from_tensor(table[row])
                row += 1
        return out


def pooled_counts(counts: list[ErrorCounts]) -> ErrorCounts:
    """Several sets' counts as one: the pooled WER is their summed edits over their summed words."""
    out = ErrorCounts()
    for c in counts:
        for f in dataclasses.fields(ErrorCounts):
            setattr(out, f.name, getattr(out, f.name) + getattr(c, f.name))
    return out


def group_counts(values: list, counts: list[ErrorCounts]) -> dict[str, ErrorCounts]:
    """Sum per-utterance counts by the utterances' values of one metadata field (None: ``NO_VALUE``).

    Every utterance falls in exactly one group, so the groups' counts add up to the whole set's."""
    out: dict[str, ErrorCounts] = {}
    for v, c in zip(values, counts):
        g = out.setdefault(group_key(v), ErrorCounts())
        for f in dataclasses.fields(ErrorCounts):
            setattr(g, f.name, getattr(g, f.name) + getattr(c, f.name))
    return dict(sorted(out.items()))


def bootstrap_interval(counts: list[ErrorCounts], seed: int = 0, num_resamples: int = 1000,
                       level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of WER and CER: utterances resampled with replacement
    (``num_resamples`` times, from ``seed``), each resample's rate its summed edits over its summed
    reference length, as for the whole set."""
    import numpy as np

    n = len(counts)
    if n == 0:
        return {"wer": (0.0, 0.0), "cer": (0.0, 0.0)}
    arr = np.array([[c.word_edits, c.ref_words, c.char_edits, c.ref_chars] for c in counts], dtype=np.float64)
    rng = np.random.default_rng(seed)
    rates = []
    block = max(1, min(num_resamples, 2_000_000 // n))  # resamples per draw: bounded memory for large sets
    done = 0
    while done < num_resamples:
        b = min(block, num_resamples - done)
        sums = arr[rng.integers(0, n, size=(b, n))].sum(axis=1)  # (b, 4)
        with np.errstate(invalid="ignore", divide="ignore"):
            rates.append(np.stack([np.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1], 0.0),
                                   np.where(sums[:, 3] > 0, sums[:, 2] / sums[:, 3], 0.0)], axis=1))
        done += b
    r = np.concatenate(rates)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {"wer": tuple(float(x) for x in np.percentile(r[:, 0], [lo, hi])),
            "cer": tuple(float(x) for x in np.percentile(r[:, 1], [lo, hi]))}


def group_report(values: list, counts: list[ErrorCounts], seed: int = 0, num_resamples: int = 1000) -> dict:
    """Per value of a field: WER, CER, the counts and 95 % bootstrap intervals (JSON-ready)."""
    out = {}
    members: dict[str, list[ErrorCounts]] = {}
    for v, c in zip(values, counts):
        members.setdefault(group_key(v), []).append(c)
    for key, g in group_counts(values, counts).items():
        ci = bootstrap_interval(members[key], seed=seed, num_resamples=num_resamples)
        out[key] = {"wer": g.wer, "cer": g.cer, "wer_ci95": list(ci["wer"]), "cer_ci95": list(ci["cer"]),
                    **dataclasses.asdict(g)}
    return out
