"""Exact distributed evaluation: every utterance once across ranks, edits summed, never averaged.

  EvalLoader (rank's share, filler batches flagged valid=False) ──forward──> logits (B, F, V)
  ──CTC loss per utterance (fp32), greedy decode──> per-rank sums [loss, word/char edits, words, chars, …]
  ──one all-reduce (SUM)──> loss = Σ loss / utterances, WER = Σ word edits / Σ reference words, CER alike
  with a GroupTable: each utterance's own counts also added to its group's row (one row per value of
  each field, laid out alike on every rank), reduced in the same all-reduce: exact per-group counts

Used during training (asr_dist.engine) and by `asr-dist evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import torch
import torch.distributed as dist

from .data import index as fmt
from .data.loader import EvalLoader, ShardSet
from .metrics import ErrorCounts, GreedyDecoder, GroupTable, utterance_counts
from .models.ctc import ctc_loss

POOLED = "pooled"  # the name of the rates over all evaluation sets together (eval/pooled/*; no set may have it)


@torch.no_grad()
def evaluate_set(forward: Callable, frame_lengths: Callable, loader: EvalLoader, decoder: GreedyDecoder, blank: int,
                 device: torch.device, dtype: torch.dtype, world_size: int, num_examples: int = 5,
                 keep_predictions: bool = False, progress=None, groups: GroupTable | None = None) -> dict:
    """``forward(inputs, attention_mask) -> logits``; ``frame_lengths(input lengths: samples or feature frames) -> frames``.

    Returns loss, wer, cer, the summed counts, a few (reference, hypothesis) examples from this
    rank, when asked every (key, reference, hypothesis, word edits) of this rank, and with ``groups``
    the counts of every group of its fields over all ranks ({field: {group: ErrorCounts}})."""
    loss_sum, counts, examples, predictions = 0.0, ErrorCounts(), [], []
    table = groups.zeros() if groups is not None else None
    audio_seconds = 0.0
    for batch in loader:
        logits = forward(batch["input_values"].to(device, dtype), batch["attention_mask"].to(device)).float()
        frames = frame_lengths(batch["attention_mask"].sum(-1)).to(torch.long)  # lengths stay on the host
        per_token = ctc_loss(logits, batch["labels"], frames, blank, reduction="per_token")
        valid = batch["valid"]
        loss_sum += float(per_token[valid.to(device)].sum())
        hyps = decoder(logits, frames)
        keep = valid.tolist()
        refs = [t for t, k in zip(batch["texts"], keep) if k]
        hyps = [h for h, k in zip(hyps, keep) if k]
        keys = [t for t, k in zip(batch["keys"], keep) if k]
        counts.add(refs, hyps)
        audio_seconds += float(batch["durations"][valid].sum())
        examples += list(zip(refs, hyps))[: max(0, num_examples - len(examples))]
        if keep_predictions or groups is not None:
            for key, r, h in zip(keys, refs, hyps):
                one = utterance_counts(r, h)
                if keep_predictions:
                    predictions.append((key, r, h, one.word_edits))
                if groups is not None:
                    groups.add(table, key, one)
        if progress is not None:
            progress.update(1)
    n = len(dataclasses.fields(ErrorCounts))
    parts = [torch.tensor([loss_sum, audio_seconds], dtype=torch.float64), counts.as_tensor()]
    if table is not None:
        parts.append(table.flatten())
    total = torch.cat(parts).to(device)
    if world_size > 1:
        dist.all_reduce(total)  # one collective for the set and all its groups
    total = total.cpu()
    counts = ErrorCounts.from_tensor(total[2:2 + n])
    out = {"loss": float(total[0]) / max(1, counts.utterances), "wer": counts.wer, "cer": counts.cer,
           "counts": counts, "audio_seconds": float(total[1]), "examples": examples, "predictions": predictions}
    if groups is not None:
        out["groups"] = groups.counts(total[2 + n:].view(groups.num_rows, n))
    return out


def missing_fields(dirs: list[str], fields: list[str]) -> tuple[list[str], list[str]]:
    """(the ``fields`` that some shard set of ``dirs`` lacks, the fields that all of them have), from
    index.json's ``fields``."""
    have = None
    for d in dirs:
        known = set(fmt.read_index(d).get("fields") or {})
        have = known if have is None else have & known
    have = have or set()
    return [f for f in fields if f not in have], sorted(have)


def group_table(shards: ShardSet, fields: list[str]) -> GroupTable:
    """The GroupTable of every utterance of ``shards`` (tar headers and sample JSON only, no audio)."""
    values = {}
    for s in shards.shards:
        for loc in fmt.list_shard(s.path):
            m = json.loads(loc.meta)
            values[loc.key] = {f: m.get(f) for f in fields}
    return GroupTable(fields, values)
