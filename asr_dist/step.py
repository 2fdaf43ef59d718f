"""One optimizer step on one rank: its micro-batches through forward and backward, then DeepSpeed's step.

  micro-batches of the step (the accumulation of them), each
      input_values (B, T) | input_features (B, F, 160) ──to the device, in the run's precision──┐
      attention_mask (B, T), labels (B, L) ───────────────────────────────────────────────────┴─>
      engine(…) ──> CTC loss, a mean over the micro-batch's B utterances ──utterance_weighted──> engine.backward
  after the last: [ZeRO-0 without fp16: every rank checks the gradients are finite] ──> engine.step()
  ──> StepResult: the loss summed per utterance (kept on the device: no host sync), utterances, audio seconds

The sync-free forward (StepSpec.sync_free) takes the CTC lengths from the attention mask on the host and the
LayerDrop draw from (seed, step), the same on every rank; transformers' own forward takes the mask itself.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .errors import TrainingError
from .memory import out_of_memory
from .models.ctc import layerdrop_draw


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a step needs besides the engine and the batches; fixed for a run."""

    input_name: str  # the forward's keyword for the model input (the family's input_name)
    device: torch.device
    input_dtype: torch.dtype  # the run's precision, for the model input
    sync_free: bool  # the sync-free forward is installed (lengths and LayerDrop from the host)
    layerdrop: float = 0.0  # with sync_free: probability of skipping each layer in a step
    num_layers: int = 0
    seed: int = 0
    utterances_per_micro: float | None = None  # the large-batch mode's mean utterances per micro-batch
    check_finite: bool = False  # ZeRO-0 without fp16: nobody else stops inf/NaN gradients reaching the weights
    samples_per_input: int = 1  # audio samples per model input step (160 for 100 Hz feature frames)
    micro_batch_key: str = "data.micro_batch_size"  # what to lower when a micro-batch does not fit
    rank: int = 0
    world_size: int = 1


@dataclasses.dataclass
class StepResult:
    loss_sum: torch.Tensor  # the micro-batches' losses times their utterances, float64, on the device
    utterances: int
    audio_seconds: float
    layer_audio_seconds: float  # audio seconds times the share of layers run (LayerDrop), for the FLOPs
    keys: list[str]


class NonFiniteStep(Exception):
    """The step's loss or gradients are inf/NaN (checked on every rank together, before the weights change)."""

    def __init__(self, loss: float, keys: list[str]):
        super().__init__(f"inf/NaN loss or gradients (loss {loss:.4g})")
        self.loss, self.keys = loss, keys


def utterance_weighted(loss: torch.Tensor, utterances: int, mean_utterances: float | None) -> torch.Tensor:
    """A micro-batch's loss for backward. The model's CTC loss is a mean over the micro-batch's
    utterances; in the large-batch mode (``mean_utterances`` set: utterances per micro-batch on
    average) it is scaled by utterances / that mean, so every utterance weighs the same in an
    optimizer step whichever micro-batch it landed in (100 short ones and 10 long ones would
    otherwise count alike). With a fixed utterance count the loss is left as it is."""
    return loss if mean_utterances is None else loss * (utterances / mean_utterances)


def keys_text(keys: list[str], limit: int = 16) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def forward(model, batch: dict, spec: StepSpec, skips: list[bool] | None = None) -> torch.Tensor:
    """The training forward of one micro-batch through ``model`` (the DeepSpeed engine, or the bare module);
    its loss, the mean over its utterances."""
    inputs = batch["input_values"].to(spec.device, spec.input_dtype, non_blocking=True)
    if "starts" in batch:  # packed by the loader (asr_dist.data.packing): each utterance's place
        return model(**{spec.input_name: inputs}, starts=batch["starts"], lengths=batch["lengths"],
                     labels=batch["labels"], skip_layers=skips).loss
    if spec.sync_free:  # masks and lengths made on the host, from these
        return model(**{spec.input_name: inputs}, lengths=batch["attention_mask"].sum(-1),
                     labels=batch["labels"], skip_layers=skips).loss
    return model(**{spec.input_name: inputs}, attention_mask=batch["attention_mask"].to(spec.device, non_blocking=True),
                 labels=batch["labels"].to(spec.device, non_blocking=True)).loss


def micro_step(engine, batch: dict, spec: StepSpec, skips: list[bool] | None) -> torch.Tensor:
    """Forward and backward of one micro-batch; its loss (the mean over its utterances)."""
    try:
        loss = forward(engine, batch, spec, skips)
        engine.backward(utterance_weighted(loss, len(batch["keys"]), spec.utterances_per_micro))
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        # one rank cannot skip a batch alone (the others would wait in its gradient reduction)
        raise TrainingError(
            f"out of memory on rank {spec.rank} in a micro-batch of {len(batch['keys'])} utterances, "
            f"{float(batch['durations'].max()):.1f} s the longest, "
            f"{batch['input_values'].shape[1] * spec.samples_per_input / 16000:.1f} s {'packed' if 'starts' in batch else 'padded'} ({keys_text(batch['keys'])}). Lower "
            f"{spec.micro_batch_key} (accumulation makes up the global batch), set "
            f"model.gradient_checkpointing=true, or rebuild the shards with a lower --max-duration") from None
    return loss


def gradients_finite(engine, loss: torch.Tensor, spec: StepSpec) -> bool:
    """Whether the loss and every gradient are finite on every rank (one all-reduce; a host sync)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=spec.device)]
    ok = (torch.isfinite(torch.stack(norms)).all() & torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if spec.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def train_step(engine, batches: list[dict], step: int, spec: StepSpec) -> StepResult:
    """Optimizer step ``step + 1`` (``step`` steps are done) on this rank, from its micro-batches of that step.

    Raises NonFiniteStep (on every rank alike) before the weights change when ``spec.check_finite`` finds
    inf/NaN; the optimizer step is then not taken."""
    skips = layerdrop_draw(spec.layerdrop, spec.num_layers, spec.seed, step) if spec.sync_free and spec.layerdrop else None
    loss_sum = torch.zeros((), device=spec.device, dtype=torch.float64)
    utterances, audio, keys = 0, 0.0, []
    for i, batch in enumerate(batches):
        loss = micro_step(engine, batch, spec, skips)
        keys.extend(batch["keys"])
        if (i == len(batches) - 1) != engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"{len(batches)} micro-batches given for a step of DeepSpeed's "
                               f"gradient_accumulation_steps={engine.gradient_accumulation_steps()}")
        if i == len(batches) - 1 and spec.check_finite and not gradients_finite(engine, loss, spec):
            raise NonFiniteStep(float(loss), keys)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        loss_sum += loss.detach().to(torch.float64) * len(batch["keys"])  # per utterance
        utterances += len(batch["keys"])
        audio += float(batch["durations"].sum())
    layer_share = 1 - sum(skips) / spec.num_layers if skips else 1.0
    return StepResult(loss_sum, utterances, audio, audio * layer_share, keys)
