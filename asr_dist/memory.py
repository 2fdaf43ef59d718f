"""data.micro_batch_size=auto: the largest micro-batch whose worst case fits the GPU, found at start-up.

  candidates: the micro-batch sizes that divide data.global_batch_size / ranks, largest first
  for each, the longest micro-batch the run can meet: its longest utterances together (silence of their
  lengths, after the slowest speed perturbation), packed at the largest capacity or padded to the longest
      ──forward + backward of the model in the run's precision, on this rank's GPU──> the allocator's peak
      + what training holds that the probe does not (fp32 master weights, Adam's moments, fp32 gradients,
        DeepSpeed's reduction bucket) <= the GPU's memory less a margin?  → the first that fits
  every rank probes its own GPU; the smallest choice over the ranks is taken (one all-reduce)

No later micro-batch is longer than the one probed (the packing capacities and the length plan hold every
epoch's): the probe answers for the run's longest batch, not its first; LayerDrop is off while it runs,
so every layer's activations count; the margin covers
the allocator's fragmentation, cuDNN's workspaces and NCCL's buffers. The model is left as it was: its
parameters are moved back where they were, and the random generators are restored, so a run with auto
trains exactly as one given the chosen size. The run's first choice is recorded in output_dir/config.yaml
and kept on resume (asr_dist.plan), so a resumed run forms the same micro-batches.

NeMo's OOMptimizer does the same search offline, per bucket, with the optimizer step included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random

import numpy as np
import torch
import torch.distributed as dist

from .data.packing import collate_packed
from .data.samples import collate
from .errors import TrainingError

log = logging.getLogger(__name__)

GiB = 2 ** 30
CPU_LIMIT = 16  # data.micro_batch_size=auto without a GPU to probe: the seed recipe's micro-batch at most
MARGIN = 0.10  # of the GPU's memory kept free (fragmentation, cuDNN workspaces, NCCL)
MIN_MARGIN = 2 * GiB


def candidates(global_batch_size: int, world_size: int) -> list[int]:
    """Micro-batch sizes that make up ``global_batch_size`` on ``world_size`` ranks with whole accumulation
    steps, largest first (empty when the global batch does not divide by the ranks)."""
    if global_batch_size % world_size:
        return []
    per_rank = global_batch_size // world_size
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def cpu_choice(sizes: list[int]) -> int:
    """auto without a GPU: the largest candidate up to CPU_LIMIT (there is no allocator to measure)."""
    return next((m for m in sizes if m <= CPU_LIMIT), sizes[-1])


def worst_batch(lengths: np.ndarray, micro: int, featurize, frames, vocab_size: int, pack_align: int | None,
                pad_to_multiple_of: int = 1) -> dict:
    """The longest micro-batch of ``micro`` utterances that ``lengths`` (samples of every utterance, as the
    loader will deliver them) can form, as the loader collates it: the ``micro`` longest, as silence through
    ``featurize``, with labels of half their CTC ``frames`` (more than any speech has: CTC's memory grows
    with the labels). Packed when ``pack_align`` is set: their packed length is the largest packing capacity
    (asr_dist.data.packing.largest_need)."""
    longest = np.sort(np.asarray(lengths, dtype=np.int64))[-micro:][::-1]
    samples = []
    for i, n in enumerate(longest.tolist()):
        x = featurize(np.zeros(n, dtype=np.float32))
        labels = [1 + (j % max(1, vocab_size - 1)) for j in range(max(1, frames(n) // 2))]  # no repeats: no blanks needed
        samples.append((f"probe-{i}", x, labels, ""))
    seconds = [n / 16000 for n in longest.tolist()]
    if pack_align is not None:
        return collate_packed(samples, pack_align, None, seconds)
    return collate(samples, pad_to_multiple_of, seconds)


def held_by_training(trainable: int, precision: str, zero_stage: int, world_size: int, bucket: int) -> int:
    """Bytes a rank holds in training beyond the probe's (parameters and gradients in the run's precision,
    activations): Adam's two fp32 moments, and fp32 master weights and gradients (ZeRO 1-2 keeps its own
    partitions of both even in fp32; stage 0 in fp32 keeps neither), divided over the ranks from ZeRO-1 on;
    DeepSpeed's reduction bucket of ``bucket`` elements."""
    per_param = 8 if precision == "fp32" and zero_stage == 0 else 16
    share = world_size if zero_stage >= 1 else 1
    element = 4 if precision == "fp32" else 2
    return -(-trainable * per_param // share) + min(bucket, trainable) * element


@dataclasses.dataclass
class Probe:
    """One candidate's measurement."""

    micro: int
    peak: int | None  # bytes the allocator reserved at most in its forward and backward; None: out of memory
    seconds: float  # audio seconds in the micro-batch

    def describe(self) -> str:
        what = "out of memory" if self.peak is None else f"{self.peak / GiB:.1f} GiB"
        return f"{self.micro} ({self.seconds:.0f} s of audio): {what}"


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None):
    """The model's parameters (in ``dtype``, as DeepSpeed casts them) and buffers on ``device`` for the block,
    then back as they were, with every random generator's state."""
    saved = [(t, t.data) for t in [*model.parameters(), *model.buffers()]]
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for p in model.parameters():
                p.data = p.data.to(device, dtype if dtype is not None and p.is_floating_point() else p.dtype)
            for b in model.buffers():
                b.data = b.data.to(device)
            yield model
        finally:
            for t, data in saved:
                t.data = data
                t.grad = None
            random.setstate(py)
            np.random.set_state(np_state)


def measure(model, batch: dict, forward, device: torch.device) -> int | None:
    """The allocator's peak bytes over a forward and backward of ``batch`` (``forward(model, batch)`` -> loss);
    None when it runs out of memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        forward(model, batch).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        for p in model.parameters():
            p.grad = None
        torch.cuda.empty_cache()


RAISED = -2  # what a rank whose probe raised sends to the others


def choose(model, sizes: list[int], make_batch, forward, device: torch.device, dtype: torch.dtype | None,
           extra: int, rank: int = 0, world_size: int = 1, accumulated: int = 0,
           group=None) -> tuple[int, list[Probe], int]:
    """(the chosen micro-batch size, what was measured, the budget in bytes): the first of ``sizes`` (largest
    first) whose ``make_batch(size)`` peaks at most the budget less ``extra`` on this GPU (less ``accumulated``
    too for a size below the first: its later micro-batches run with the gradients of the earlier ones); the
    smallest choice over the ranks, agreed over ``group`` (gloo; None: the default group). A rank whose probe
    raises tells the others, so that every rank stops."""
    free, total = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device) - max(int(MARGIN * total), MIN_MARGIN)
    probes, chosen, error = [], 0, None
    model.train()
    try:
        with on_device(model, device, dtype):
            for m in sizes:
                batch = make_batch(m)
                probe = Probe(m, measure(model, batch, forward, device), float(batch["durations"].sum()))
                probes.append(probe)
                if probe.peak is not None and probe.peak + extra + (accumulated if m < sizes[0] else 0) <= budget:
                    chosen = m
                    break
    except Exception as e:
        if world_size == 1:
            raise
        error = e
    if world_size > 1:
        mine = RAISED if error is not None else chosen if chosen else -1
        agreed = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        theirs = int(agreed.item())
        if error is not None:
            raise error
        if theirs == RAISED:
            raise TrainingError("data.micro_batch_size=auto: the memory probe failed on another rank (its log says "
                                "why); give data.micro_batch_size a number to start without it")
        if theirs != chosen and chosen:
            log.info("rank %d: micro-batch %d fits here; another rank's GPU takes %s", rank, chosen,
                     theirs if theirs > 0 else "none")
        if theirs < 0 and chosen:
            raise TrainingError(f"data.micro_batch_size=auto: no candidate size fits another rank's GPU (its log "
                                f"says what each measured); rank {rank} fits {chosen}")
        chosen = max(0, theirs)
    if not chosen:
        raise TrainingError(
            f"data.micro_batch_size=auto: not even a micro-batch of {sizes[-1]} utterance(s) fits rank {rank}'s GPU "
            f"({'; '.join(p.describe() for p in probes)}; budget {budget / GiB:.1f} GiB less {extra / GiB:.1f} GiB for "
            f"the optimizer). Set model.gradient_checkpointing=true, rebuild the shards with a lower --max-duration, "
            f"or shard the optimizer over more GPUs (distributed.zero_stage=2)")
    return chosen, probes, budget
