"""data.micro_batch_size=auto (and data.micro_batch_seconds=auto in the large-batch mode): the largest micro-batch
whose worst case fits the GPU, found at start-up.

  candidates: the micro-batch sizes that divide data.global_batch_size / ranks, largest first (or the
  micro-batch seconds that divide data.global_batch_seconds / ranks and still hold the longest utterance)
  for each, the longest micro-batch the run can meet: its longest utterances together (silence of their
  lengths, after the slowest speed perturbation; as many as the seconds hold), packed at the largest
  capacity or padded to the longest
      ──forward + backward of the model in the run's precision, on this rank's GPU──> the allocator's peak
      + what training holds that the probe does not (fp32 master weights, Adam's moments, fp32 gradients,
        DeepSpeed's reduction bucket) <= the GPU's memory less a margin?
  the largest first, then a bisection of the rest (the peak grows with the micro-batch), so that a long list
  of seconds costs a few probes; every rank probes its own GPU; the smallest choice over the ranks is taken
  (one all-reduce)

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


MAX_SECONDS_CANDIDATES = 4096  # micro-batch seconds tried at most: a bisection probes about 12 of them


def seconds_candidates(global_batch_seconds: float, world_size: int, longest: float) -> list[float]:
    """Micro-batch seconds that make up ``global_batch_seconds`` on ``world_size`` ranks with whole accumulation
    steps and still hold an utterance of ``longest`` seconds, largest first (empty when none does)."""
    per_rank = global_batch_seconds / world_size
    return [per_rank / k for k in range(1, MAX_SECONDS_CANDIDATES + 1) if per_rank / k >= longest]


def cpu_seconds_choice(seconds: list[float], longest: float) -> float:
    """data.micro_batch_seconds=auto without a GPU: the largest candidate up to CPU_LIMIT of the longest
    utterances (the seed's micro-batch count, at the worst length)."""
    return next((s for s in seconds if s <= CPU_LIMIT * longest), seconds[-1])


def worst_count(lengths: np.ndarray, seconds: float, pad_to_multiple_of: int = 1) -> int:
    """How many of the longest of ``lengths`` (samples) the probe of a micro-batch of ``seconds`` (padding
    included, asr_dist.data.batching.cut_by_seconds) takes: the fewest whose padded size reaches the seconds.
    The loader's micro-batches hold utterances x longest <= the seconds, so none holds more utterances of
    more frames than the probe (which may be one utterance over); that bounds what grows with the utterances
    even when packed: the per-utterance attention, the positional convolution's layout, the logits and CTC."""
    longest = int(np.max(lengths))
    padded = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return int(min(len(lengths), max(1, -(-(seconds * 16000) // padded))))


def worst_batch(lengths: np.ndarray, micro: int, featurize, frames, vocab_size: int, pack_align: int | None,
                pad_to_multiple_of: int = 1, capacity: int | None = None) -> dict:
    """The longest micro-batch of ``micro`` utterances that ``lengths`` (samples of every utterance, as the
    loader will deliver them) can form, as the loader collates it: the ``micro`` longest, as silence through
    ``featurize``, with labels of half their CTC ``frames`` (more than any speech has: CTC's memory grows
    with the labels). Packed when ``pack_align`` is set: at ``capacity`` samples, the largest packing capacity
    (asr_dist.data.packing.largest_need); None: their packed length, which is that capacity when micro-batches
    count utterances."""
    longest = np.sort(np.asarray(lengths, dtype=np.int64))[-micro:][::-1]
    samples = []
    for i, n in enumerate(longest.tolist()):
        x = featurize(np.zeros(n, dtype=np.float32))
        labels = [1 + (j % max(1, vocab_size - 1)) for j in range(max(1, frames(n) // 2))]  # no repeats: no blanks needed
        samples.append((f"probe-{i}", x, labels, ""))
    seconds = [n / 16000 for n in longest.tolist()]
    if pack_align is not None:
        return collate_packed(samples, pack_align, None if capacity is None else (capacity,), seconds)
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

    micro: int | float  # the candidate: utterances (int), or seconds in the large-batch mode (float)
    peak: int | None  # bytes the allocator reserved at most in its forward and backward; None: out of memory
    seconds: float  # audio seconds in the micro-batch
    utterances: int = 0

    def describe(self) -> str:
        what = "out of memory" if self.peak is None else f"{self.peak / GiB:.1f} GiB"
        if isinstance(self.micro, float):
            return f"{self.micro:g} s ({self.utterances} utterances): {what}"
        return f"{self.micro} ({self.seconds:.0f} s of audio): {what}"


def search(n: int, fits) -> int:
    """The first of ``n`` candidates (largest first, the peak growing with the candidate) for which ``fits(i)``:
    the largest, which usually fits, then a bisection of the rest; ``n`` when none fits."""
    if n == 0 or fits(0):
        return 0
    lo, hi = 1, n  # the answer lies in [lo, hi]; hi == n: none fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None):
    """The model's parameters (in ``dtype``, as DeepSpeed casts them) and buffers on ``device`` for the block,
    then back as they were, with every random generator's state. A forward that replaces a buffer (the conformer's
    positional table grows into a new tensor) gets the old one back in its slot."""
    saved = [(t, t.data) for t in [*model.parameters(), *model.buffers()]]
    slots = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()]
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for p in model.parameters():
                p.data = p.data.to(device, dtype if dtype is not None and p.is_floating_point() else p.dtype)
            for b in model.buffers():
                b.data = b.data.to(device)
            yield model
        finally:
            for m, name, b in slots:
                m._buffers[name] = b
            for t, data in saved:
                t.data = data
                t.grad = None
            random.setstate(py)
            np.random.set_state(np_state)


# what cuBLAS, cuDNN and cuFFT say when they cannot allocate their workspace or handle on a nearly full GPU: torch
# raises these as a RuntimeError, not as torch.OutOfMemoryError (CUBLAS_STATUS_ALLOC_FAILED, cuDNN 8's
# CUDNN_STATUS_ALLOC_FAILED, cuDNN 9's CUDNN_STATUS_INTERNAL_ERROR_{DEVICE,HOST}_ALLOCATION_FAILED, CUFFT_ALLOC_FAILED)
ALLOCATION_FAILURES = ("_ALLOC_FAILED", "_ALLOCATION_FAILED", "out of memory")


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says the GPU ran out of memory (torch.OutOfMemoryError is a RuntimeError too)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ALLOCATION_FAILURES))


def measure(model, batch: dict, forward, device: torch.device) -> int | None:
    """The allocator's peak bytes over a forward and backward of ``batch`` (``forward(model, batch)`` -> loss);
    None when it runs out of memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        forward(model, batch).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        return None
    finally:
        for p in model.parameters():
            p.grad = None
        torch.cuda.empty_cache()


def agree(index: int, n: int, raised: bool, group=None) -> int:
    """The ranks' choices (indexes into the same ``n`` candidates, largest first; ``n``: none fits) made one:
    the smallest candidate any rank can take; -1 when a rank's probe raised (it tells the others so that every
    rank stops rather than waits)."""
    mine = torch.tensor([n + 1 if raised else index], dtype=torch.int64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
    theirs = int(mine.item())
    return -1 if theirs == n + 1 else theirs


def choose(model, sizes: list, make_batch, forward, device: torch.device, dtype: torch.dtype | None,
           extra: int, rank: int = 0, world_size: int = 1, accumulated: int = 0, group=None,
           key: str = "data.micro_batch_size") -> tuple[int | float, list[Probe], int]:
    """(the chosen candidate, what was measured, the budget in bytes): the first of ``sizes`` (micro-batch
    sizes or seconds, largest first) whose ``make_batch(candidate)`` peaks at most the budget less ``extra`` on
    this GPU (less ``accumulated`` too below the first: its later micro-batches run with the gradients of the
    earlier ones); the smallest choice over the ranks, agreed over ``group`` (gloo; None: the default group).
    A rank whose probe raises tells the others, so that every rank stops. ``key`` names the setting in
    messages."""
    free, total = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device) - max(int(MARGIN * total), MIN_MARGIN)
    probes, error, n = [], None, len(sizes)

    def fits(i: int) -> bool:
        batch = make_batch(sizes[i])
        probe = Probe(sizes[i], measure(model, batch, forward, device), float(batch["durations"].sum()),
                      len(batch["durations"]))
        probes.append(probe)
        return probe.peak is not None and probe.peak + extra + (accumulated if i > 0 else 0) <= budget

    model.train()
    index = n
    try:
        with on_device(model, device, dtype):
            index = search(n, fits)
        # the probe's peak is no training figure (perf/gpu_memory_gb), and the blocks its copies of the parameters
        # held are DeepSpeed's to take
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    except Exception as e:
        if world_size == 1:
            raise
        error = e
    if world_size > 1:
        theirs = agree(index, n, error is not None, group)
        if error is not None:
            raise error
        if theirs < 0:
            raise TrainingError(f"{key}=auto: the memory probe failed on another rank (its log says why); give "
                                f"{key} a number to start without it")
        if theirs != index and index < n:
            log.info("rank %d: %s=%s fits here; another rank's GPU takes %s", rank, key, sizes[index],
                     sizes[theirs] if theirs < n else "none")
        if theirs == n and index < n:
            raise TrainingError(f"{key}=auto: no candidate fits another rank's GPU (its log says what each "
                                f"measured); rank {rank} fits {sizes[index]}")
        index = theirs
    if index == n:
        smallest = f"{sizes[-1]:g} s" if isinstance(sizes[-1], float) else f"{sizes[-1]} utterance(s)"
        raise TrainingError(
            f"{key}=auto: not even a micro-batch of {smallest} fits rank {rank}'s GPU "
            f"({'; '.join(p.describe() for p in probes)}; budget {budget / GiB:.1f} GiB less {extra / GiB:.1f} GiB for "
            f"the optimizer). Set model.gradient_checkpointing=true, rebuild the shards with a lower --max-duration, "
            f"or shard the optimizer over more GPUs (distributed.zero_stage=2)")
    return sizes[index], probes, budget
