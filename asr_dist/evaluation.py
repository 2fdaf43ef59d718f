"""Exact distributed evaluation: every utterance once across ranks, edits summed, never averaged.

  EvalLoader (rank's share, filler batches flagged valid=False) ──forward──> logits (B, F, V)
  ──CTC loss per utterance (fp32), greedy decode──> per-rank sums [loss, word/char edits, words, chars, …]
  ──one all-reduce (SUM)──> loss = Σ loss / utterances, WER = Σ word edits / Σ reference words, CER alike

Used during training (asr_dist.engine) and by `asr-dist evaluate`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .data.loader import EvalLoader
from .metrics import ErrorCounts, GreedyDecoder
from .models.ctc import ctc_loss


@torch.no_grad()
def evaluate_set(forward: Callable, frame_lengths: Callable, loader: EvalLoader, decoder: GreedyDecoder, blank: int,
                 device: torch.device, dtype: torch.dtype, world_size: int, num_examples: int = 5,
                 keep_predictions: bool = False, progress=None) -> dict:
    """``forward(inputs, attention_mask) -> logits``; ``frame_lengths(input lengths: samples or feature frames) -> frames``.

    Returns loss, wer, cer, the summed counts, a few (reference, hypothesis) examples from this
    rank, and, when asked, every (key, reference, hypothesis, word edits) of this rank."""
    loss_sum, counts, examples, predictions = 0.0, ErrorCounts(), [], []
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
        if keep_predictions:
            for key, r, h in zip(keys, refs, hyps):
                one = ErrorCounts()
                one.add([r], [h])
                predictions.append((key, r, h, one.word_edits))
        if progress is not None:
            progress.update(1)
    total = torch.cat([torch.tensor([loss_sum, audio_seconds], dtype=torch.float64), counts.as_tensor()]).to(device)
    if world_size > 1:
        dist.all_reduce(total)
    counts = ErrorCounts.from_tensor(total[2:].cpu())
    return {"loss": float(total[0]) / max(1, counts.utterances), "wer": counts.wer, "cer": counts.cer,
            "counts": counts, "audio_seconds": float(total[1]), "examples": examples, "predictions": predictions}
