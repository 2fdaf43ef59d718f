"""One plan of a training run: everything that can be checked without a model or a GPU, computed once.

  Config, world size ──plan_run──> RunPlan
      model.*            ──family_of──> family (resolved once; what it cannot honour is refused)
                         ──run_config──> model_config: the checkpoint's or preset's transformers config with
                                         the run's overrides (vocabulary, SpecAugment, dropout, adapters)
                         ──> featurize (the loader workers' input) and alignable (CTC frames >= labels)
      augment.*          ──Augmentation.from_config──> augment (its noise and impulse-response directories read)
      data.train_shards  ──ShardSet.open──> shards (a set, several, or a weighted mix; builds checked)
      data.eval_shards   ──> eval_sets (vocabulary equal to the training set's, eval.group_by fields present)
      batch sizes, world ──> accumulation, steps per epoch, total steps ──deepspeed_config──> ds_config
                         (data.micro_batch_size or data.micro_batch_seconds auto: settled here on CPU or on a
                         resume; else the candidates the Trainer probes on the GPU, asr_dist.memory)
  RunPlan ──> engine.Trainer: the loader of each rank (RunPlan.loader), the model, DeepSpeed
          ──> `asr-dist train --dry-run`: RunPlan.describe, without building a model

Checks that cross the config and the models live here: asr_dist.config is data and merging, and reads no
checkpoint. A config file is read by ``load_run_config`` (``load_config`` and the model's checks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import memory
from .config import AUTO, Config, ConfigError, length_plan, load_config, shard_dirs
from .data.augment import Augmentation
from .data.index import build_failure, read_index
from .data.loader import TrainLoader, unalignable
from .data.packing import largest_need, packed_length
from .data.samples import input_padding
from .data.shardset import ShardSet
from .deepspeed_config import check_layerdrop, deepspeed_config
from .evaluation import check_group_fields
from .models import ModelFamily, family_of
from .trackers import check_trackers

log = logging.getLogger(__name__)


def check_model(cfg: Config) -> ModelFamily:
    """The family of the model section, resolved once (model.pretrained's config.json or model.family),
    with what it cannot honour refused (a ModelError naming the key)."""
    family = family_of(cfg.model)
    family.check(cfg.model, cfg.distributed.zero_stage)
    return family


def load_run_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The config of a training run: defaults < YAML < overrides, validated, and its model section checked
    against its family (the checks that need no shard set)."""
    cfg = load_config(path, overrides)
    check_model(cfg)
    Augmentation.from_config(cfg.augment, cfg.seed)  # an empty or unreadable noise or RIR directory stops here
    check_trackers(cfg.log)  # an unknown tracker, or one whose package is missing
    return cfg


def model_name(cfg: Config, family: ModelFamily) -> str:
    """The model a run trains, as messages name it: its checkpoint directory, or family and preset."""
    return cfg.model.pretrained or f"{family.name} {cfg.model.preset}"


def check_shard_builds(cfg: Config) -> None:
    """A shard set whose build rejected more than its --max-reject-fraction is refused unless
    data.allow_failed_shards says to use it anyway."""
    if cfg.data.allow_failed_shards:
        return
    sets = [("data.train_shards", d) for d in shard_dirs(cfg.data.train_shards)]
    sets += [(f"data.eval_shards.{name}", d) for name, d in cfg.data.eval_shards.items()]
    for key, d in sets:
        try:
            why = build_failure(read_index(d))
        except FileNotFoundError:
            continue  # not a shard set at all: opening it says so
        if why:
            raise ConfigError(f"{key}: {d}: {why}. Fix the inputs and build it again (or with a higher "
                              f"--max-reject-fraction), or set data.allow_failed_shards=true to use it as it is")


@dataclasses.dataclass
class RunPlan:
    """What a run will do, resolved from its config and world size before any model or GPU work."""

    cfg: Config
    world_size: int
    cuda: bool  # the accelerator is a GPU (the DeepSpeed JSON's optimizer, pinned loader memory)
    family: ModelFamily
    model_config: Any  # the transformers config the model will have (the run's overrides applied)
    shards: ShardSet  # the training data (one set, several read as one, or a weighted mix)
    eval_sets: dict[str, ShardSet]  # data.eval_shards, opened and checked
    featurize: Callable  # 1-D float32 16 kHz audio -> the model's input, in the loader's workers
    alignable: Any  # the model's picklable check that CTC can align an utterance (frames >= labels)
    steps_per_epoch: int  # optimizer steps
    accumulation: int  # micro-batches per optimizer step on each rank
    total_steps: int  # optimizer steps of the whole run
    ds_config: dict  # the DeepSpeed JSON, as every rank gets it
    augment: Augmentation | None = None  # the training audio's augmentation (the augment section); None: none
    # data.micro_batch_size=auto on a GPU: the sizes the Trainer probes (asr_dist.memory), largest first (seconds
    # for data.micro_batch_seconds=auto); until then the plan's arithmetic is the first's. Empty: settled
    micro_candidates: list = dataclasses.field(default_factory=list)
    _loaders: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self.shards.vocab

    @property
    def pack_align(self) -> int | None:
        """data.pack: the samples every packed utterance starts on a multiple of (the model's frame stride)."""
        return self.family.frame_stride(self.model_config) if self.cfg.data.pack else None

    @property
    def utterances_per_micro(self) -> float | None:
        """The large-batch mode's mean utterances per micro-batch (its micro-batches hold different numbers of
        utterances, so each micro-batch's loss is weighted by its count over this); None with a fixed count."""
        if self.cfg.data.micro_batch_seconds is None:
            return None
        return self.shards.num_samples / (self.steps_per_epoch * self.accumulation * self.world_size)

    def loader(self, rank: int) -> TrainLoader:
        """The training loader of ``rank``: every rank's is made from the same settings (equal micro-batch
        counts, one length plan)."""
        if rank not in self._loaders:
            d = self.cfg.data
            self._loaders[rank] = TrainLoader(
                self.shards, rank=rank, world_size=self.world_size, micro_batch_size=d.micro_batch_size,
                global_batch_size=d.global_batch_size, num_workers=d.num_workers, seed=self.cfg.seed,
                bucket_batches=d.bucket_batches, on_corrupt=d.on_corrupt, pin_memory=self.cuda,
                pad_to_multiple_of=d.pad_to_multiple_of, micro_batch_seconds=d.micro_batch_seconds,
                global_batch_seconds=d.global_batch_seconds, sync_buckets=d.sync_buckets, featurize=self.featurize,
                alignable=self.alignable, length_plan=length_plan(d), pack_align=self.pack_align,
                augment=self.augment)
        return self._loaders[rank]

    def settle_batches(self) -> None:
        """The batch arithmetic of data.* as it stands: steps per epoch, accumulation, total steps, DeepSpeed's
        JSON (every rank's loader agrees; the first checks)."""
        listed = self._loaders[0].catalogue() if 0 in self._loaders else None
        self._loaders.clear()
        first = self.loader(0)
        first.use_catalogue(listed)  # the shards are listed once, whatever the batch sizes
        self.steps_per_epoch, self.accumulation = first.steps_per_epoch, first.accumulation
        self.total_steps = self.cfg.train.max_steps or self.cfg.train.num_epochs * self.steps_per_epoch
        self.ds_config = deepspeed_config(self.cfg, self.world_size, self.total_steps, cuda=self.cuda)

    @property
    def micro_key(self) -> str:
        """The setting that sizes a micro-batch: data.micro_batch_size, or data.micro_batch_seconds in the
        large-batch mode."""
        return "data.micro_batch_" + ("size" if self.cfg.data.micro_batch_seconds is None else "seconds")

    def use_micro_batch(self, value: int | float) -> None:
        """auto settled by the start-up probe: the plan made again for a micro-batch of ``value`` (utterances,
        or seconds in the large-batch mode)."""
        setattr(self.cfg.data, self.micro_key.split(".")[1], value)
        self.micro_candidates = []
        self.settle_batches()

    def probe_batch(self, value: int | float) -> dict:
        """The longest micro-batch of ``value`` utterances (or, in the large-batch mode, of ``value`` seconds: the
        longest utterances, as many as it holds) this run can meet, as the loader collates it (silence of their
        lengths; asr_dist.memory.worst_batch)."""
        d, lengths = self.cfg.data, self.loader(0).lengths()
        padding = input_padding(self.featurize, d.pad_to_multiple_of)
        capacity = None
        if d.micro_batch_seconds is not None:
            count = memory.worst_count(lengths, value, d.pad_to_multiple_of)
            if self.pack_align is not None:  # the largest capacity, or more when the probe is one utterance over
                capacity = max(largest_need(lengths, self.pack_align, micro_batch_seconds=value),
                               packed_length(np.sort(lengths)[-count:].tolist(), self.pack_align))
            value = count
        return memory.worst_batch(lengths, value, self.featurize, self.alignable.frames, len(self.vocab),
                                  self.pack_align, padding, capacity)

    def model_name(self) -> str:
        return model_name(self.cfg, self.family)

    def describe(self, check_alignment: bool = True) -> str:
        """What `asr-dist train --dry-run` prints: the DeepSpeed JSON, the batch arithmetic, and (listing every
        training shard, without audio) how many utterances the model cannot align."""
        d = self.cfg.data
        batch = (f"{d.global_batch_size} = micro {d.micro_batch_size}" if d.micro_batch_seconds is None else
                 f"{d.global_batch_seconds:g} s = micro {d.micro_batch_seconds:g} s")
        c = self.micro_candidates
        if c:
            among = (', '.join(map(str, c)) if d.micro_batch_seconds is None else
                     f"{len(c)} from {c[0]:g} s down to {c[-1]:g} s")
            batch += (f" ({self.micro_key}=auto: the largest of {among} that fits the GPU, probed at start-up; the "
                      f"arithmetic is {c[0]:g}'s)")
        lines = [json.dumps(self.ds_config, indent=1),
                 f"world size {self.world_size}: {self.shards.num_samples} utterances, "
                 f"{self.shards.audio_seconds / 3600:.2f} h of audio; {self.steps_per_epoch} steps per epoch (global "
                 f"batch {batch} x accumulation {self.accumulation} x {self.world_size} ranks); "
                 f"{self.total_steps} steps in all"]
        if self.pack_align is not None:
            caps = self.loader(0).capacities
            lines.append(f"packed micro-batches: each utterance on a multiple of {self.pack_align} samples, at "
                         f"{len(caps)} capacities of {', '.join(f'{c / 16000:.1f}' for c in caps)} s of audio")
        if self.augment is not None:
            lines.append(f"augmentation of the training audio: {self.augment.describe()}")
        if self.eval_sets:
            by = f", WER by {', '.join(self.cfg.eval.group_by)}" if self.cfg.eval.group_by else ""
            lines.append("evaluation sets: " + "; ".join(f"{name} {s.num_samples} utterances ({s.audio_seconds / 3600:.2f} h)"
                                                         for name, s in self.eval_sets.items()) + by)
        if check_alignment:
            refused = unalignable(self.shards, self.alignable)
            if refused:
                key, frames, need = refused[0]
                lines.append(f"{len(refused)} of {self.shards.num_samples} training utterances cannot be aligned by "
                             f"{self.model_name()}: more CTC labels than its frames (e.g. {key}: {need} frames needed, "
                             f"{frames} made); training skips them (train/skipped_samples)")
            else:
                lines.append(f"every training utterance can be aligned by {self.model_name()} "
                             f"(no more CTC labels than frames)")
        return "\n".join(lines)


def resolve_precision(cfg: Config, cuda: bool) -> None:
    """distributed.precision=auto made concrete in ``cfg``: bf16 where the GPU computes it natively, fp16 on an
    older GPU (dynamic loss scaling), fp32 on CPU (DeepSpeed refuses fp16 there)."""
    if cfg.distributed.precision != "auto":
        return
    if cuda:
        import torch

        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        chosen, why = ("bf16", "the GPU computes bf16") if bf16 else ("fp16", "the GPU has no native bf16")
    else:
        chosen, why = "fp32", "no GPU: DeepSpeed refuses fp16 on CPU, and bf16 is slower there"
    log.info("distributed.precision=auto: %s (%s); distributed.precision=... chooses another", chosen, why)
    cfg.distributed.precision = chosen


CONFIG_NAME = "config.yaml"  # the resolved config of the run, in output_dir (written by the Trainer)


def recorded_micro_batch(cfg: Config, key: str = "data.micro_batch_size") -> int | float | None:
    """``key`` (data.micro_batch_size or data.micro_batch_seconds) in the run's own record (output_dir/config.yaml),
    when it is a number and there is a checkpoint to resume (a run stopped before its first checkpoint probes
    again)."""
    from .checkpoint import CHECKPOINTS, latest

    path = Path(cfg.output_dir) / CONFIG_NAME
    if cfg.train.resume == "never" or not path.is_file() or latest(Path(cfg.output_dir) / CHECKPOINTS) is None:
        return None
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.load(path), key)
    except Exception:  # an unreadable record: the resume says so; the probe chooses afresh
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def resolve_micro_batch_size(cfg: Config, world_size: int, cuda: bool) -> list[int]:
    """data.micro_batch_size=auto made concrete in ``cfg`` where no GPU need be asked: the run's earlier choice on
    a resume, the largest candidate up to 16 on CPU; on a GPU the candidates the Trainer probes (the largest
    is set meanwhile). Returns those candidates, or [] when settled."""
    d = cfg.data
    if d.micro_batch_size != AUTO:
        return []
    if d.micro_batch_seconds is not None:  # the large-batch mode counts seconds; the size is unused
        d.micro_batch_size = 1
        return []
    sizes = memory.candidates(d.global_batch_size, world_size)
    if not sizes:
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not a multiple of the {world_size} ranks: "
                          f"no micro-batch size can make it up; choose a multiple of {world_size}")
    kept = recorded_micro_batch(cfg)
    if isinstance(kept, int) and kept in sizes:
        log.info("data.micro_batch_size=auto: %d, as this run chose at its start (%s/config.yaml), so that a resume "
                 "forms the same micro-batches", kept, cfg.output_dir)
        d.micro_batch_size = kept
        return []
    if not cuda:
        d.micro_batch_size = memory.cpu_choice(sizes)
        log.info("data.micro_batch_size=auto: %d (no GPU to probe: the largest that makes up the global batch, up "
                 "to %d)", d.micro_batch_size, memory.CPU_LIMIT)
        return []
    d.micro_batch_size = sizes[0]
    return sizes


def resolve_micro_batch_seconds(cfg: Config, world_size: int, cuda: bool, longest: float) -> list[float]:
    """data.micro_batch_seconds=auto made concrete in ``cfg`` where no GPU need be asked (as
    resolve_micro_batch_size, with seconds that hold an utterance of ``longest`` seconds). Returns the candidates
    the Trainer probes, or [] when settled."""
    d = cfg.data
    if d.micro_batch_seconds != AUTO:
        return []
    seconds = memory.seconds_candidates(d.global_batch_seconds, world_size, longest)
    if not seconds:
        raise ConfigError(f"data.micro_batch_seconds=auto: data.global_batch_seconds={d.global_batch_seconds:g} over "
                          f"{world_size} rank(s) is {d.global_batch_seconds / world_size:g} s per rank, less than the "
                          f"longest utterance ({longest:g} s, after augment.speed_factors); raise "
                          f"data.global_batch_seconds, or rebuild the shards with a lower --max-duration")
    kept = recorded_micro_batch(cfg, "data.micro_batch_seconds")
    kept = next((s for s in seconds if kept is not None and math.isclose(s, kept, rel_tol=1e-9)), None)
    if kept is not None:
        log.info("data.micro_batch_seconds=auto: %g, as this run chose at its start (%s/config.yaml), so that a "
                 "resume forms the same micro-batches", kept, cfg.output_dir)
        d.micro_batch_seconds = kept
        return []
    if not cuda:
        d.micro_batch_seconds = memory.cpu_seconds_choice(seconds, longest)
        log.info("data.micro_batch_seconds=auto: %g (no GPU to probe: the largest that makes up the global batch, up "
                 "to %d of the longest utterances)", d.micro_batch_seconds, memory.CPU_LIMIT)
        return []
    d.micro_batch_seconds = seconds[0]
    return seconds


def plan_run(cfg: Config, world_size: int, cuda: bool = False) -> RunPlan:
    """The plan of ``cfg`` on ``world_size`` ranks; anything that cannot work raises here, with what to change
    (ConfigError, LoaderError, ModelError), before a process group, a model or a GPU is touched.
    distributed.precision=auto is made concrete in ``cfg``."""
    resolve_precision(cfg, cuda)
    micro_candidates = resolve_micro_batch_size(cfg, world_size, cuda)
    check_trackers(cfg.log)
    family = check_model(cfg)
    # LayerDrop on several ranks needs the sync-free forward's shared draws; the Trainer checks again once the
    # model tells whether that forward serves it
    check_layerdrop(cfg, world_size, shared_draws=cfg.model.sync_free_forward and family.sync_free)
    check_shard_builds(cfg)
    cache = dict(cache_dir=cfg.data.cache_dir, cache_max_gb=cfg.data.cache_max_gb)
    shards = ShardSet.open(cfg.data.train_shards, cfg.data.mix_temperature, **cache)
    eval_sets = {name: ShardSet.open(d, **cache).for_evaluation() for name, d in cfg.data.eval_shards.items()}
    for name, s in eval_sets.items():
        if s.vocab != shards.vocab:
            raise ConfigError(f"data.eval_shards.{name}: its vocab.json differs from the training set's")
    check_group_fields(list(cfg.eval.group_by), eval_sets)
    model_config = family.run_config(cfg.model, shards.vocab)
    if cfg.model.attention == "flex_attention" and not cuda:
        raise ConfigError("model.attention=flex_attention on CPU: PyTorch's flex attention has no backward there; "
                          "use model.attention=sdpa (or leave it out) on CPU")
    if cfg.data.pack:
        why = family.packing_refusal(model_config)
        if why is None and not cfg.model.sync_free_forward:
            why = "packing runs through the sync-free forward, and model.sync_free_forward is false"
        if why is None and cfg.model.attention == "flash_attention_2":
            why = ("model.attention=flash_attention_2 takes no document mask (use flex_attention, which skips the "
                   "blocks between utterances, or sdpa)")
        if why:
            raise ConfigError(f"data.pack=true with {model_name(cfg, family)}: "
                              f"{why}. Set data.pack=false")
    augment = Augmentation.from_config(cfg.augment, cfg.seed)
    stretch = augment.longest_stretch if augment is not None else 1.0
    if cfg.data.micro_batch_seconds == AUTO and shards.max_seconds is None:
        raise ConfigError(f"data.micro_batch_seconds=auto: {', '.join(shards.dirs)} has no duration histogram in its "
                          f"index.json, so the longest utterance is unknown; give data.micro_batch_seconds a number, or "
                          f"rebuild the shards with `asr-dist shards build`")
    longest = (shards.max_seconds or 0.0) * stretch
    micro_candidates += resolve_micro_batch_seconds(cfg, world_size, cuda, longest)
    plan = RunPlan(cfg=cfg, world_size=world_size, cuda=cuda, family=family, model_config=model_config,
                   shards=shards, eval_sets=eval_sets, featurize=family.featurizer(),
                   alignable=family.alignment_check(model_config), steps_per_epoch=0, accumulation=0, total_steps=0,
                   ds_config={}, augment=augment, micro_candidates=micro_candidates)
    plan.settle_batches()
    return plan
