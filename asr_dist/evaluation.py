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
import logging
from typing import Callable

import torch
import torch.distributed as dist

from .data import index as fmt
from .config import ConfigError
from .data.eval_loader import EvalLoader
from .data.shardset import ShardSet, list_samples
from .metrics import ErrorCounts, GreedyDecoder, GroupTable, pooled_counts, utterance_counts
from .models.ctc import ctc_loss

log = logging.getLogger(__name__)

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
        for loc in list_samples(s):
            m = json.loads(loc.meta)
            values[loc.key] = {f: m.get(f) for f in fields}
    return GroupTable(fields, values)


# ───────────────────────────── the evaluations during training ─────────────────────────────


def check_group_fields(group_by: list[str], eval_sets: dict[str, ShardSet]) -> None:
    """Every eval.group_by field must be in every evaluation set's samples (index.json ``fields``)."""
    for name, s in eval_sets.items():
        missing, have = missing_fields(s.dirs, group_by)
        if missing:
            raise ConfigError(
                f"eval.group_by: data.eval_shards.{name} ({', '.join(s.dirs)}) has no metadata field "
                f"{', '.join(missing)}; fields there: {', '.join(have) or '(none)'}. Rebuild that set with "
                f"`asr-dist shards build … --keep-fields {','.join(missing)}`, or drop the field from eval.group_by")


def set_result(loss: float, counts, groups: dict | None = None) -> dict:
    """An evaluation set's results as logged and written: rates, counts, and per group of each field."""
    out = {"loss": loss, "wer": counts.wer, "cer": counts.cer, "utterances": counts.utterances,
           "words": counts.ref_words, "counts": dataclasses.asdict(counts)}
    if groups:
        out["groups"] = {field: {g: {"wer": c.wer, "cer": c.cer, **dataclasses.asdict(c)} for g, c in gs.items()}
                         for field, gs in groups.items()}
    return out


def eval_scalars(name: str, result: dict) -> dict:
    """TensorBoard/JSONL scalars of one set's results: eval/NAME/{loss,wer,cer}, and per group of each
    field eval/NAME/{wer,cer,utterances,words}_by_FIELD/GROUP."""
    out = {f"eval/{name}/{k}": result[k] for k in ("loss", "wer", "cer")}
    for field, groups in (result.get("groups") or {}).items():
        for g, c in groups.items():
            out.update({f"eval/{name}/wer_by_{field}/{g}": c["wer"], f"eval/{name}/cer_by_{field}/{g}": c["cer"],
                        f"eval/{name}/utterances_by_{field}/{g}": c["utterances"],
                        f"eval/{name}/words_by_{field}/{g}": c["ref_words"]})
    return out


class TrainingEvaluation:
    """The evaluations of a training run: every set of data.eval_shards, exact over the ranks, per group of
    each eval.group_by field, and pooled over the sets; written to TensorBoard and the JSONL log."""

    def __init__(self, cfg, sets: dict[str, ShardSet], vocab: dict[str, int], rank: int, world: int, featurize, writer):
        """``sets``: the evaluation sets, opened and checked by the run's plan (asr_dist.plan)."""
        group_by = list(cfg.eval.group_by)
        # every utterance's group in each field, read once (sample JSON only); every rank lays the groups out alike
        self.group_tables = {name: group_table(s, group_by) for name, s in sets.items() if group_by}
        self.loaders = {name: EvalLoader(s, rank=rank, world_size=world, micro_batch_size=cfg.data.eval_micro_batch_size,
                                         micro_batch_seconds=cfg.data.eval_micro_batch_seconds,
                                         num_workers=cfg.data.num_workers, featurize=featurize)
                        for name, s in sets.items()}
        self.decoder = GreedyDecoder(vocab)
        self.world, self.num_examples, self.writer = world, cfg.eval.num_examples, writer

    def __call__(self, engine, family, step: int, device: torch.device, dtype: torch.dtype) -> dict:
        """Evaluate ``engine`` (in eval mode) on every set at ``step``; log and return the results."""
        results = {}
        model = engine.module
        counts = {}
        for name, loader in self.loaders.items():
            r = evaluate_set(lambda x, m: engine(**{family.input_name: x}, attention_mask=m).logits,
                             lambda n: family.output_frames(model.config, n), loader, self.decoder,
                             model.config.pad_token_id,
                             device, dtype, self.world, self.num_examples,
                             groups=self.group_tables.get(name))
            counts[name] = r["counts"]
            results[name] = set_result(r["loss"], r["counts"], r.get("groups"))
            self.writer.scalars(step, eval_scalars(name, results[name]))
            self.writer.text(f"eval/{name}/examples", "\n\n".join(f"REF: {a}  \nHYP: {b}" for a, b in r["examples"]), step)
            log.info("step %d eval %s: loss %.4f WER %.4f CER %.4f (%d utterances)", step, name, r["loss"], r["wer"],
                     r["cer"], r["counts"].utterances)
            for field, groups in (r.get("groups") or {}).items():
                log.info("step %d eval %s by %s: %s", step, name, field,
                         ", ".join(f"{g} WER {c.wer:.4f} ({c.utterances})" for g, c in groups.items()))
        if len(counts) > 1:  # the sets as one: summed edits over summed words (and loss per utterance)
            pooled = pooled_counts(list(counts.values()))
            loss = sum(results[n]["loss"] * c.utterances for n, c in counts.items()) / max(1, pooled.utterances)
            results[POOLED] = set_result(loss, pooled)
            self.writer.scalars(step, eval_scalars(POOLED, results[POOLED]))
            log.info("step %d eval pooled over %d sets: loss %.4f WER %.4f CER %.4f (%d utterances)", step, len(counts),
                     loss, pooled.wer, pooled.cer, pooled.utterances)
        return results
