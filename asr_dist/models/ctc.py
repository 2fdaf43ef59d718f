"""What every CTC family shares: the CTC loss from host-side lengths, the label check, and LayerDrop: its shared
draws and the layer loop that honours them."""

from __future__ import annotations

import torch


def layerdrop_draw(probability: float, layers: int, seed: int, step: int) -> list[bool]:
    """Which transformer layers LayerDrop skips in optimizer step ``step``: drawn from a generator
    seeded with (seed, step) alone, so every rank and every micro-batch of the step skips the same
    layers (DeepSpeed then reduces gradients of the same parameters on every rank), a resumed run
    draws what the uninterrupted one drew, and 1 or N ranks draw alike."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return (torch.rand(layers, generator=generator) < probability).tolist()


def ctc_loss(logits: torch.Tensor, labels: torch.Tensor, frame_lengths: torch.Tensor, blank: int,
             reduction: str = "mean", zero_infinity: bool = True) -> torch.Tensor:
    """transformers' CTC loss (fp32 log-softmax; labels -100 and blank dropped; "mean": per target
    length, then over the batch; "per_token": per target length, each utterance's; "sum"; "none")
    from labels and lengths on the CPU: the targets are packed there, as
    a (batch, longest) block, and the lengths stay there, so ``F.ctc_loss`` copies nothing back from
    the GPU (given lengths on the GPU, it would)."""
    keep = (labels >= 0) & (labels != blank)
    target_lengths = keep.sum(-1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # each row's kept labels first, in order
    width = max(1, int(target_lengths.max()))
    targets = labels.gather(1, order)[:, :width].masked_fill(~keep.gather(1, order)[:, :width], blank)
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):
        nll = torch.nn.functional.ctc_loss(log_probs, to_device(targets, logits.device), frame_lengths,
                                           target_lengths, blank=blank, reduction="none", zero_infinity=zero_infinity)
    if reduction in ("none", "sum"):
        return nll.sum() if reduction == "sum" else nll
    # divided here: F.ctc_loss would divide by the lengths where they are, on the CPU
    per_token = nll / to_device(target_lengths.clamp(min=1), nll.device)
    return per_token.mean() if reduction == "mean" else per_token


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to ``device`` without waiting for it (pinned first, so the copy is asynchronous)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)



def check_label_ids(labels: torch.Tensor | None, vocab_size: int) -> None:
    """Label ids (on the host) within the CTC head's vocabulary, or a ValueError saying which vocab is wrong."""
    if labels is not None and labels.max() >= vocab_size:
        raise ValueError(f"label id {int(labels.max())} is outside the model's vocabulary of {vocab_size}: "
                         f"the shards' vocab.json is not the one the CTC head was sized for")


def run_layers(layers, hidden: torch.Tensor, attention, training: bool, layerdrop: float,
               skip_layers: list[bool] | None) -> torch.Tensor:
    """The transformer layers over ``hidden`` with LayerDrop: ``skip_layers`` (``layerdrop_draw``: the same on every
    rank) says which to skip; without it each layer is drawn from torch's generator, as transformers draws it."""
    for i, layer in enumerate(layers):
        if skip_layers is not None:
            skip = training and skip_layers[i]
        else:
            skip = training and layerdrop > 0.0 and bool(torch.rand([]) < layerdrop)
        if not skip:  # (LayerDrop is refused under ZeRO-3, which would have to gather every layer)
            hidden = layer(hidden, attention_mask=attention)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden
