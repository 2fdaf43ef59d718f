"""The experiment config: typed dataclasses, YAML, dotted overrides; one truth for everything.

  defaults (these dataclasses) < experiment YAML < `key.sub=value` overrides on the command line
  ──OmegaConf structured merge (unknown keys are errors, with the closest valid key)──> Config
  ──validate (cross-field checks, messages that say what to change)──> Config
  ──asr_dist.deepspeed_config.deepspeed_config(cfg, world_size)──> the DeepSpeed JSON

Every field is documented where it is declared; `docs/config.md` is generated from these
docstrings and comments (``python -m asr_dist.config --markdown``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

from .errors import UserError


AUTO = "auto"  # data.micro_batch_size chosen at start-up (asr_dist.memory)


class ConfigError(UserError, ValueError):
    """A config that cannot work; the message names the key and what to change."""


@dataclass
class DataArgs:
    train_shards: Any = field(default_factory=list)  # one or more shard-set directories (asr-dist shards build), read as one; or a weighted mix {name: {path: DIR, weight: W}}: each epoch draws from each set in proportion to its weight
    mix_temperature: Optional[float] = None  # a mix's weights from its sets' hours instead: weight = hours ** τ (1: by size, 0: equal; NeMo's and Omnilingual ASR's re-weighting); then give the sets without weights
    eval_shards: dict = field(default_factory=dict)  # named evaluation sets: {name: shard-set directory}
    global_batch_size: int = 32  # utterances per optimizer step, over all ranks and accumulation
    micro_batch_size: Any = 16  # utterances per forward pass on one rank; or auto: on a GPU, the largest that divides data.global_batch_size / ranks and whose longest micro-batch (the longest utterances together, packed at the largest capacity or padded) fits the GPU's memory with the optimizer's state, found by a forward and backward at start-up (logged; a resume keeps the run's first choice); on CPU the largest of those up to 16
    eval_micro_batch_size: int = 16  # utterances per evaluation forward pass
    eval_micro_batch_seconds: Optional[float] = None  # or evaluation forward passes of as many utterances as fit in this many seconds of audio, padding included
    micro_batch_seconds: Any = None  # large-batch mode: fill each micro-batch with as many similar-length utterances as fit in this many seconds of audio, padding included; then data.global_batch_seconds replaces the two batch sizes above. auto: on a GPU, the largest that divides data.global_batch_seconds / ranks and whose worst micro-batch (the longest utterances, as many as it holds) fits the GPU's memory with the optimizer's state, found at start-up (logged; a resume keeps the run's first choice); on CPU the largest of those up to 16 of the longest utterances
    global_batch_seconds: Optional[float] = None  # large-batch mode: audio seconds (padding included) per optimizer step over all ranks and accumulation; a multiple of data.micro_batch_seconds x ranks
    num_workers: int = 2  # DataLoader worker processes per rank
    bucket_batches: Optional[int] = None  # length bucketing buffer, in micro-batches (1 = no bucketing); default: 32, and with a fixed utterance count enough for 1024 utterances (more agree closer across ranks, less padding; about 100 kB of FLAC an utterance per loader worker)
    sync_buckets: bool = True  # streamed batches (data.length_plan=false, and the large-batch mode): the ranks of a step take micro-batches of the same length quantile of their buffers (a shared shuffle), so none waits long for the slowest
    length_plan: Optional[bool] = None  # default: on with a fixed utterance count, off in the large-batch mode. Plan the epoch from every utterance's length (each rank reads every utterance's length and offsets from the set's samples.tsv at start-up, or lists the shards of a set built without one, then reads utterances at their offsets): a step's ranks hold neighbouring lengths at any world size (on a 3.4 h corpus, 64 ranks x 1: the slowest rank does 1.04x the mean's work, where sync_buckets alone leaves 1.37x; bench/rank_balance.py). false: each reader streams its shards and sorts its own buffer (sync_buckets)
    pack: bool = False  # packed micro-batches: each micro-batch's utterances end to end in one sequence, each attending only to its own frames (no padding in the transformer layers; the same loss and gradients as padded, within float tolerance); wav2vec2, HuBERT and data2vec-audio with a layer-norm feature encoder, through the sync-free forward
    pad_to_multiple_of: int = 1  # pad each batch's length to a multiple of this many samples (16000: whole seconds): fewer distinct shapes for cuDNN and torch.compile
    on_corrupt: str = "stop"  # a damaged sample or shard: stop naming it, or skip and count it
    allow_failed_shards: bool = False  # train on a shard set whose build rejected more than --max-reject-fraction
    cache_dir: Optional[str] = None  # shard sets at URLs (https://, s3://, pipe:): a node-local directory ($TMPDIR, /local/scratch/$SLURM_JOB_ID; environment variables are expanded) where each shard is fetched once per node and checked against index.json's sha256 before use. Default: none; shards are read by byte ranges, or streamed where the server gives none
    cache_max_gb: Optional[float] = None  # data.cache_dir's size limit: the least recently used shards are removed to stay under it (default: no limit)


@dataclass
class ModelArgs:
    pretrained: Optional[str] = None  # local directory of a pretrained checkpoint (no downloads); its config.json's model_type names the family: wav2vec2 (XLS-R, MMS), hubert, wavlm, data2vec-audio, wav2vec2-conformer, wav2vec2-bert (w2v-BERT 2.0)
    preset: Optional[str] = None  # or a from-scratch size: tiny, base, xlsr-300m (= large) for wav2vec2; each family lists its own
    family: Optional[str] = None  # the encoder family of model.preset (default wav2vec2); with model.pretrained it is read from config.json, and a different value here is an error
    add_adapter: Optional[bool] = None  # wav2vec2-bert: its convolutional adapter after the encoder (stride 2: 25 CTC frames a second instead of 50); true on a checkpoint without one adds a random one, as Hugging Face's w2v-BERT 2.0 fine-tuning recipe does; default: as the checkpoint (presets: none)
    freeze_feature_encoder: Optional[bool] = None  # keep the conv front end fixed; default: yes for model.pretrained, no for a preset
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about 30 % more time
    attention: Optional[str] = None  # attention kernel: sdpa (PyTorch's fused, the fastest safe default), eager, flash_attention_2, flex_attention (PyTorch's compiled block-sparse kernel: with data.pack it skips the blocks between utterances, where sdpa computes them masked); default: sdpa where the family has it (wavlm: eager only)
    cudnn_attention: bool = False  # let PyTorch use cuDNN's fused attention: fast per call, but it builds a graph for every new batch shape (off: flash / memory-efficient kernels)
    cudnn_benchmark: bool = False  # let cuDNN time every convolution algorithm for each new input shape and keep the fastest: pays only with few distinct shapes (data.pad_to_multiple_of=16000)
    fft_positional_conv: bool = False  # compute the positional convolution (kernel 128, 16 groups) with FFTs in float32: the same result (within 1e-5), about 40x fewer FLOPs
    sync_free_forward: bool = True  # training forward with its masks and CTC lengths made on the host from the loader's lengths: the GPU is never waited for inside it (transformers' forward waits up to 9 times per micro-batch); same loss and gradients. false: transformers' own forward
    compile: bool = False  # torch.compile each transformer layer (regional: one graph shared by every layer, dynamic length) and the feature encoder's norm + GELU; refused for wav2vec2-conformer and wav2vec2-bert, whose layers compile anew at every batch length
    layerdrop: float = 0.0  # probability of skipping each transformer layer in an optimizer step: the same layers on every rank and micro-batch (ZeRO stage 0-2)
    mask_time_prob: float = 0.05  # SpecAugment: share of frames masked in time
    mask_time_length: int = 10  # SpecAugment: frames per time mask
    mask_feature_prob: float = 0.0  # SpecAugment: share of feature channels masked
    mask_feature_length: int = 64  # SpecAugment: channels per feature mask
    hidden_dropout: float = 0.0  # dropout in the transformer's hidden states
    attention_dropout: float = 0.0  # dropout on attention probabilities
    activation_dropout: float = 0.0  # dropout inside the feed-forward blocks
    feat_proj_dropout: float = 0.0  # dropout after the feature projection
    final_dropout: float = 0.0  # dropout before the CTC head
    train_adapters_only: bool = False  # MMS adapter-only fine-tuning (wav2vec2 family, pre-norm layout): small attention adapters in every transformer layer are (re)initialised and train with the CTC head; everything else is frozen (about 2.5 M parameters per language for mms-1b). Needs model.adapter_language
    adapter_language: Optional[str] = None  # with model.train_adapters_only: the language code of the adapter (e.g. dan); the export also writes adapter.<language>.safetensors for load_adapter
    adapter_attn_dim: Optional[int] = None  # with model.train_adapters_only: the adapters' bottleneck width; default: the checkpoint's adapter_attn_dim, else 16 (MMS's)


@dataclass
class OptimArgs:
    name: str = "adamw"  # adam or adamw (decoupled weight decay)
    lr: float = 1e-4  # peak learning rate, reached after warmup
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # weight decay
    warmup_steps: int = 2000  # linear warmup from 0, then linear decay to 0 at the last step
    grad_clip: float = 1.0  # gradient norm clipping (0 disables it)
    torch_adam: bool = True  # torch's AdamW (fused CUDA kernel on a GPU); false: DeepSpeed's FusedAdam, compiled with nvcc at first use


@dataclass
class DistributedArgs:
    precision: str = "fp16"  # fp16 (dynamic loss scaling), bf16, fp32, or auto: bf16 on a GPU that has it (Ampere and newer), fp16 on an older GPU, fp32 on CPU (the choice is logged and written into output_dir/config.yaml)
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3; 1 reduces gradients once per optimizer step (2: at every micro-batch, for less memory; 3: parameters partitioned too)
    overlap_comm: bool = True  # overlap gradient reduction with backward
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced
    reduce_bucket_size: int = 200_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 200_000_000  # elements per parameter all-gather bucket
    initial_scale_power: int = 16  # fp16: start the loss scale at 2**this
    loss_scale_window: int = 1000  # fp16: steps without overflow before the scale grows
    hysteresis: int = 2  # fp16: overflows tolerated before the scale shrinks
    min_loss_scale: float = 1.0  # fp16: the scale never goes below this
    max_skipped_steps: int = 50  # consecutive steps skipped for inf/NaN gradients that stop the run, with a diagnosis
    timeout_minutes: int = 30  # collective timeout: a hung rank stops the others within this
    heartbeat_timeout_s: float = 300.0  # a rank silent this long is lost: the others stop, naming it (0: off)
    watchdog_factor: float = 10.0  # a rank with no optimizer step for this many median step times is hung: every rank dumps its stacks to the log and the job stops, naming the frame it waits in (0: off)
    watchdog_floor_s: float = 600.0  # the watchdog never trips before this many seconds without a step
    deepspeed_config: Optional[str] = None  # your own DeepSpeed JSON, merged in; contradictions are errors


@dataclass
class TrainArgs:
    max_steps: Optional[int] = None  # optimizer steps to train (or give num_epochs)
    num_epochs: Optional[int] = None  # epochs to train, counted in optimizer steps per epoch
    log_every: int = 10  # steps between console/TensorBoard/JSONL training logs
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    resume: str = "auto"  # auto: from the latest checkpoint in output_dir; never; or a checkpoint path
    average_last: int = 0  # export the element-wise mean of the last N checkpoints (this many are kept; the final one included) instead of the final weights; 0: off
    average_best: int = 0  # or of the best N checkpoints by the evaluation metric the run ranks by (train.early_stopping's, else the first set's WER); a checkpoint is saved at every evaluation and the best N are kept; 0: off
    early_stopping: dict = field(default_factory=dict)  # stop when an evaluation metric stops improving: {metric: wer|cer|loss, patience: K evaluations, min_delta: D (an improvement must beat the best by more), set: NAME or pooled (default: the first evaluation set)}; the best model is then exported as output_dir/model; {} = off
    save_final: bool = True  # false: no final checkpoint and no output_dir/model when training ends (an improved evaluation still exports output_dir/best), for throughput measurements and smoke runs; train.checkpoint_every and a preemption still save; refused with train.early_stopping, average_last and average_best
    profile_steps: list = field(default_factory=list)  # [first, last] optimizer steps to trace with torch.profiler: a trace per rank (chrome://tracing, Perfetto) and a table of the top kernels under {output_dir}/profile/; [] = off


@dataclass
class EvalArgs:
    every_steps: int = 500  # steps between evaluations on every data.eval_shards set (0: only at the end)
    num_examples: int = 5  # (reference, hypothesis) pairs shown in TensorBoard per evaluation
    group_by: list = field(default_factory=list)  # metadata fields of the eval samples to break WER/CER down by at every evaluation, e.g. [gender, dialect]: eval/NAME/wer_by_FIELD/VALUE (and cer_, utterances_, words_by_) in TensorBoard, counts in eval_results.json; exact on any number of ranks, no bootstrap intervals during training (asr-dist evaluate --by gives them); [] = none


@dataclass
class LogArgs:
    trackers: list = field(default_factory=lambda: ["tensorboard", "jsonl"])  # where rank 0 logs metrics: tensorboard, jsonl (metrics.jsonl, which `asr-dist report` reads), mlflow, wandb (pip install 'asr-dist[trackers]'); the config goes in as parameters, the model card and evaluation reports as artifacts
    run_name: Optional[str] = None  # the run's name in MLflow and W&B; default: output_dir's last part
    mlflow_tracking_uri: Optional[str] = None  # MLflow's tracking URI (http://…, file:…, databricks, …); default: MLFLOW_TRACKING_URI, else a file store in {output_dir}/mlruns; credentials come from MLflow's environment variables
    mlflow_experiment: str = "asr-dist"  # the MLflow experiment (made when missing)
    wandb_project: str = "asr-dist"  # the W&B project
    wandb_mode: str = "offline"  # offline: the run is written to {output_dir}/wandb with no network (`wandb sync` uploads it later); online: live, with the API key from WANDB_API_KEY


@dataclass
class AugmentArgs:
    speed_prob: float = 0.0  # share of training utterances played faster or slower (resampled: length and pitch change, as Kaldi's and NeMo's speed perturbation), at one of augment.speed_factors; the loader plans with each perturbed length
    speed_factors: list = field(default_factory=lambda: [0.9, 1.1])  # speed factors to draw from (1.1: 10 % faster, shorter), each in [0.5, 2]
    noise_dir: Optional[str] = None  # a directory of noise recordings (WAV, FLAC, …, any rate; searched recursively), e.g. MUSAN's noise and music; a stretch of one is added at an SNR from augment.noise_snr_db
    noise_prob: float = 0.0  # share of training utterances with noise added (needs augment.noise_dir)
    noise_snr_db: list = field(default_factory=lambda: [5.0, 20.0])  # [lowest, highest] signal-to-noise ratio in dB
    rir_dir: Optional[str] = None  # a directory of room impulse responses (WAV, FLAC, …), convolved with the speech and aligned on their direct path
    rir_prob: float = 0.0  # share of training utterances reverberated (needs augment.rir_dir)
    lowpass_prob: float = 0.0  # share of training utterances band-limited by a low-pass at a cutoff from augment.lowpass_hz
    lowpass_hz: list = field(default_factory=lambda: [2000.0, 6000.0])  # [lowest, highest] low-pass cutoff in Hz
    telephone_prob: float = 0.0  # share of training utterances sent through a telephone channel: 8 kHz, 300-3400 Hz, and augment.telephone_codec
    telephone_codec: str = "ulaw"  # the telephone channel's codec, through libsndfile: ulaw or alaw (G.711), gsm (GSM 6.10), none (band only)
    gain_prob: float = 0.0  # share of training utterances whose level changes by a gain from augment.gain_db, clipped to [-1, 1] (models that normalise each utterance, as wav2vec2's, hear only the clipping)
    gain_db: list = field(default_factory=lambda: [-10.0, 6.0])  # [lowest, highest] gain in dB


@dataclass
class Config:
    output_dir: str = MISSING  # everything the run writes: tensorboard/, metrics.jsonl, checkpoints/, model/
    seed: int = 0  # seeds model init, data order and SpecAugment
    data: DataArgs = field(default_factory=DataArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    augment: AugmentArgs = field(default_factory=AugmentArgs)
    log: LogArgs = field(default_factory=LogArgs)  # training audio changed on the fly, drawn per utterance from (seed, epoch, key); evaluation never is


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _all_keys(type(default), name + ".")
    return keys


def _unknown_key_error(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or str(e)
    close = difflib.get_close_matches(str(key), _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _node(cfg: DictConfig, key: str):
    """The config node at a dotted ``key`` (its type says what a value there must be), or None."""
    parent, _, leaf = key.rpartition(".")
    container = OmegaConf.select(cfg, parent) if parent else cfg
    return container._get_node(leaf) if isinstance(container, DictConfig) and leaf in container else None


def _write_instead(cfg: DictConfig, override: str) -> str:
    """What to write instead of an override whose value does not fit the key's type."""
    key, _, raw = override.partition("=")
    node = _node(cfg, key)
    if isinstance(node, ListConfig):
        return f"{key} takes a list: write {key}=[{raw}] (several: {key}=[a,b])"
    if isinstance(node, DictConfig):
        return f"{key} takes a map of names to values: write {key}.NAME={raw} (e.g. {key}.dev={raw})"
    default = node._value() if node is not None else None
    for kind, what in ((BooleanNode, "true or false"), (IntegerNode, "a whole number"), (FloatNode, "a number")):
        if isinstance(node, kind):
            example = "" if default is None else f", e.g. {key}={json.dumps(default)}"
            return f"{key} takes {what}, not {raw!r}{example}"
    return ""


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """defaults < YAML at ``path`` < ``key=value`` overrides; validated."""
    cfg = merge_config(path, overrides)
    validate(cfg)
    return cfg


def merge_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """defaults < YAML at ``path`` < ``key=value`` overrides, every key and type checked; the cross-field
    checks (paths that must exist, batch sizes that must divide) are ``validate``'s."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path:
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such config file")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not key=value (e.g. train.max_steps=100)")
    try:
        cfg = OmegaConf.merge(*layers)
        for o in overrides or []:
            key = o.split("=", 1)[0]
            try:
                value = OmegaConf.select(OmegaConf.from_dotlist([o]), key)
            except OmegaConfBaseException:
                raise
            except Exception as e:  # the value is parsed as YAML: yaml's errors, undecodable bytes
                raise ConfigError(f"command line: {o!r}: the value is not valid YAML "
                                  f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); quote it") from None
            if isinstance(_node(cfg, key), ListConfig) and isinstance(value, str):
                value = [value]  # `data.train_shards=/data/x`: a single path where a list is expected
            try:
                # replace, not merge: `data.eval_shards={}` empties the map rather than keeping the YAML's sets
                OmegaConf.update(cfg, key, value, merge=False)
            except (ConfigAttributeError, ConfigKeyError) as e:
                raise _unknown_key_error(e, "command line") from None
            except OmegaConfBaseException as e:
                raise ConfigError(f"command line: {o}: {_write_instead(cfg, o) or str(e).splitlines()[0]}") from None
        obj: Config = OmegaConf.to_object(cfg)
    except (ConfigAttributeError, ConfigKeyError) as e:
        raise _unknown_key_error(e, path or "config") from None
    except OmegaConfBaseException as e:
        msg = str(e).split("\n")[0]
        raise ConfigError(f"{path or 'config'}: {msg} (key {getattr(e, 'full_key', '?')})") from None
    # both keys also take auto, so OmegaConf leaves a number that arrives as text (${oc.env:MICRO}, a quoted
    # YAML value) a string: it is read as that number
    micro = obj.data.micro_batch_size
    if isinstance(micro, str) and micro.strip().isdigit():
        micro = obj.data.micro_batch_size = int(micro)
    if micro != AUTO and (isinstance(micro, bool) or not isinstance(micro, int)):
        raise ConfigError(f"data.micro_batch_size takes a whole number or auto, not {micro!r}, e.g. "
                          f"data.micro_batch_size=16 (auto: the largest that fits the GPU)")
    seconds = obj.data.micro_batch_seconds
    if isinstance(seconds, str) and seconds != AUTO:
        try:
            seconds = obj.data.micro_batch_seconds = float(seconds)
        except ValueError:
            pass
    if seconds is not None and seconds != AUTO and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
        raise ConfigError(f"data.micro_batch_seconds takes a number of seconds or auto, not {seconds!r}, e.g. "
                          f"data.micro_batch_seconds=600 (auto: the largest that fits the GPU)")
    if isinstance(seconds, int) and not isinstance(seconds, bool):
        obj.data.micro_batch_seconds = float(seconds)
    return obj


def length_plan(data: DataArgs) -> bool:
    """data.length_plan as the loader takes it: unset means on with a fixed utterance count (the large-batch
    mode cuts its micro-batches by seconds, which the plan does not do)."""
    return data.micro_batch_seconds is None if data.length_plan is None else bool(data.length_plan)


def check_mix(train_shards, temperature: float | None):
    """data.train_shards as a plain list of directories, or as a mix {name: {"path": DIR, "weight": W}}
    (weights > 0, or none of them with data.mix_temperature)."""
    if not isinstance(train_shards, dict):
        if temperature is not None:
            raise ConfigError("data.mix_temperature weighs the sets of a mix: give data.train_shards as "
                              "{name: {path: DIR}, …}")
        return list(train_shards)
    mix = {}
    for name, entry in train_shards.items():
        where = f"data.train_shards.{name}"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: give {{path: DIR, weight: W}}, not {entry!r}")
        unknown = sorted(set(entry) - {"path", "weight"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a set of a mix has path and weight")
        if not entry.get("path"):
            raise ConfigError(f"{where}: no path; give the shard directory as {where}.path")
        weight = entry.get("weight")
        if temperature is not None and weight is not None:
            raise ConfigError(f"{where}.weight and data.mix_temperature both weigh the mix: give one of them")
        if temperature is None:
            if weight is None:
                raise ConfigError(f"{where}: no weight; give {where}.weight (> 0), or data.mix_temperature")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ConfigError(f"{where}.weight={weight!r}: give a number above 0 (leave a set out to not use it)")
        mix[str(name)] = {"path": str(entry["path"]), "weight": None if weight is None else float(weight)}
    if not mix:
        raise ConfigError("data.train_shards is a mix that names no set: give {name: {path: DIR, weight: W}, …}")
    if temperature is not None and not temperature >= 0:
        raise ConfigError(f"data.mix_temperature={temperature}: give 0 (equal weights) or more (1: by hours)")
    return mix


def shard_dirs(train_shards) -> list[str]:
    """The directories of data.train_shards, a list or a mix."""
    if isinstance(train_shards, dict):
        return [entry["path"] for entry in train_shards.values()]
    return [str(d) for d in train_shards]


def validate(cfg: Config) -> None:
    """Cross-field checks of the config alone, once, at load time (what needs a checkpoint, a model family or
    the shard sets is asr_dist.plan's)."""
    if not cfg.output_dir or cfg.output_dir == MISSING:
        raise ConfigError("output_dir is required: where the run writes logs, checkpoints and the model")
    if isinstance(cfg.data.train_shards, dict) and not cfg.data.train_shards:
        raise ConfigError("data.train_shards is a mix that names no set: give {name: {path: DIR, weight: W}, …}")
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is required: one or more shard directories from `asr-dist shards build`, "
                          "or a weighted mix {name: {path: DIR, weight: W}, …}")
    if isinstance(cfg.data.train_shards, str):
        cfg.data.train_shards = [cfg.data.train_shards]
    cfg.data.train_shards = check_mix(cfg.data.train_shards, cfg.data.mix_temperature)
    if cfg.data.length_plan is True and cfg.data.micro_batch_seconds is not None:
        raise ConfigError("data.length_plan=true plans micro-batches of a fixed utterance count: leave "
                          "data.micro_batch_seconds out (use data.micro_batch_size), or set data.length_plan=false")
    if isinstance(cfg.data.train_shards, dict) and cfg.data.micro_batch_seconds is not None:
        raise ConfigError("data.train_shards is a weighted mix: the large-batch mode (data.micro_batch_seconds) "
                          "does not mix by weight yet; give a plain list of shard directories, or a fixed utterance count")
    if (cfg.model.pretrained is None) == (cfg.model.preset is None):
        raise ConfigError("give exactly one of model.pretrained (a local checkpoint directory) or model.preset "
                          "(tiny, base, xlsr-300m, …; with model.family for another family than wav2vec2)")
    if cfg.model.pretrained is not None and not (Path(cfg.model.pretrained) / "config.json").exists():
        raise ConfigError(f"model.pretrained={cfg.model.pretrained}: no config.json there; point it at a local "
                          f"checkpoint directory (save_pretrained layout); nothing is downloaded")
    if cfg.model.attention is not None and cfg.model.attention not in ("sdpa", "eager", "flash_attention_2",
                                                                       "flex_attention"):
        raise ConfigError(f"model.attention={cfg.model.attention!r}; choose one of sdpa, eager, flash_attention_2, "
                          f"flex_attention")
    if (cfg.train.max_steps is None) == (cfg.train.num_epochs is None):
        raise ConfigError("give exactly one of train.max_steps or train.num_epochs")
    for name, value in (("train.max_steps", cfg.train.max_steps), ("train.num_epochs", cfg.train.num_epochs)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1")
    choices = {
        "distributed.precision": (cfg.distributed.precision, ("fp16", "bf16", "fp32", "auto")),
        "optim.name": (cfg.optim.name, ("adam", "adamw")),
        "data.on_corrupt": (cfg.data.on_corrupt, ("stop", "skip")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}; choose one of {', '.join(allowed)}")
    if cfg.distributed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage={cfg.distributed.zero_stage}; choose 0, 1, 2 or 3")
    if cfg.train.resume not in ("auto", "never") and not Path(cfg.train.resume).exists():
        raise ConfigError(f"train.resume={cfg.train.resume}: no such checkpoint; use auto, never or a checkpoint path")
    if not 0.0 <= cfg.model.layerdrop < 1.0:
        raise ConfigError("model.layerdrop must be in [0, 1)")
    if cfg.model.layerdrop > 0 and cfg.distributed.zero_stage == 3:
        # deepspeed 0.19's ZeRO-3 hands its optimizer the partition a parameter's gradient was last reduced into:
        # measured with 2 ranks and layerdrop 0.5, the loss parts from stages 0-2's (equal to each other) at step 4
        raise ConfigError(
            f"model.layerdrop={cfg.model.layerdrop} with distributed.zero_stage=3: DeepSpeed's ZeRO-3 would update a "
            f"skipped layer with an older step's gradient, so every layer would have to run and LayerDrop would do "
            f"nothing. Use distributed.zero_stage 1 or 2, or model.layerdrop=0")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas takes two numbers, e.g. [0.9, 0.999]")
    for key in ("micro_batch_size", "micro_batch_seconds"):
        if getattr(cfg.data, key) == AUTO and cfg.distributed.zero_stage == 3:
            raise ConfigError(f"data.{key}=auto with distributed.zero_stage=3: the memory probe runs the whole "
                              f"model on each GPU, which ZeRO-3 is there to avoid; give data.{key} a number")
    if cfg.data.micro_batch_size != AUTO and cfg.data.micro_batch_size < 1 or cfg.data.global_batch_size < 1:
        raise ConfigError("data.micro_batch_size and data.global_batch_size must be at least 1")
    if cfg.data.cache_max_gb is not None and not cfg.data.cache_max_gb > 0:
        raise ConfigError(f"data.cache_max_gb={cfg.data.cache_max_gb}: give a size above 0 in GB, or null for no limit")
    if cfg.data.cache_max_gb is not None and not cfg.data.cache_dir:
        raise ConfigError("data.cache_max_gb limits data.cache_dir, which is not set: give data.cache_dir too")
    if cfg.data.eval_micro_batch_seconds is not None and not cfg.data.eval_micro_batch_seconds > 0:
        raise ConfigError("data.eval_micro_batch_seconds must be above 0 (or null: data.eval_micro_batch_size)")
    seconds = (cfg.data.micro_batch_seconds, cfg.data.global_batch_seconds)
    if (seconds[0] is None) != (seconds[1] is None) or any(x is not None and x != AUTO and not 0 < x < math.inf
                                                           for x in seconds):
        raise ConfigError("the large-batch mode takes both data.micro_batch_seconds and data.global_batch_seconds, "
                          "above 0 (e.g. 600 and 1200 for one GPU: two micro-batches of up to 600 s per step)")
    gb = list(cfg.eval.group_by)
    if not all(isinstance(f, str) and f.strip() for f in gb) or len(set(gb)) != len(gb):
        raise ConfigError(f"eval.group_by={gb}: give distinct metadata field names, e.g. [gender, dialect], or []")
    if len(cfg.data.eval_shards) > 1 and "pooled" in cfg.data.eval_shards:
        raise ConfigError("data.eval_shards.pooled: with several evaluation sets, eval/pooled/* holds the rates over "
                          "all of them; give this set another name")
    ps = cfg.train.profile_steps
    if ps and not (len(ps) == 2 and all(isinstance(x, int) for x in ps) and 1 <= ps[0] <= ps[1]):
        raise ConfigError(f"train.profile_steps={list(ps)}: give [first, last] optimizer steps, 1 <= first <= last "
                          f"(e.g. [20, 22]: a few steps after the first ones), or [] for no profile")
    if cfg.distributed.watchdog_factor < 0 or not cfg.distributed.watchdog_floor_s > 0:
        raise ConfigError("distributed.watchdog_factor must be at least 0 (0: no watchdog) and "
                          "distributed.watchdog_floor_s above 0 (e.g. 10 and 600)")
    check_augment(cfg.augment)
    check_run_end(cfg)
    if not 1 <= cfg.data.pad_to_multiple_of <= 16000 * 30:
        raise ConfigError(f"data.pad_to_multiple_of={cfg.data.pad_to_multiple_of}: give samples, 1 (no rounding) to "
                          f"480000 (30 s); 16000 rounds batches up to whole seconds")


EARLY_STOPPING_KEYS = ("metric", "patience", "min_delta", "set")


def check_run_end(cfg: Config) -> None:
    """train.early_stopping, train.average_last and train.average_best."""
    t = cfg.train
    es = dict(t.early_stopping or {})
    if es:
        unknown = sorted(set(es) - set(EARLY_STOPPING_KEYS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], EARLY_STOPPING_KEYS, n=1)
            raise ConfigError(f"train.early_stopping: unknown key {unknown[0]!r}"
                              + (f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(EARLY_STOPPING_KEYS)}"))
        if es.get("metric", "wer") not in ("wer", "cer", "loss"):
            raise ConfigError(f"train.early_stopping.metric={es['metric']!r}; choose wer, cer or loss")
        patience = es.get("patience")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"train.early_stopping.patience={patience!r}: give the evaluations without improvement "
                              f"to stop after, a whole number of 1 or more (e.g. 5)")
        delta = es.get("min_delta", 0.0)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or delta < 0:
            raise ConfigError(f"train.early_stopping.min_delta={delta!r}: give 0 or a small positive number (e.g. 0.001)")
    ranked = es or t.average_best
    if ranked and not (cfg.data.eval_shards and cfg.eval.every_steps > 0):
        what = "train.early_stopping" if es else "train.average_best"
        raise ConfigError(f"{what} ranks evaluations: give data.eval_shards and eval.every_steps > 0")
    name = es.get("set")
    if name is not None and name not in cfg.data.eval_shards and not (name == "pooled" and len(cfg.data.eval_shards) > 1):
        raise ConfigError(f"train.early_stopping.set={name!r}: not an evaluation set; choose one of "
                          f"{', '.join(cfg.data.eval_shards) or '(none given)'}"
                          + (" or pooled" if len(cfg.data.eval_shards) > 1 else ""))
    if t.average_last < 0 or t.average_best < 0 or (t.average_last and t.average_best):
        raise ConfigError("give train.average_last=N or train.average_best=N (N >= 2 checkpoints), not both")
    if t.average_last == 1 or t.average_best == 1:
        raise ConfigError("averaging one checkpoint is that checkpoint: give 2 or more, or 0 for off")
    if t.keep_checkpoints and t.average_last > t.keep_checkpoints:  # 0 keeps every checkpoint
        raise ConfigError(f"train.average_last={t.average_last} averages more checkpoints than are kept "
                          f"(train.keep_checkpoints={t.keep_checkpoints}): raise train.keep_checkpoints to at least "
                          f"{t.average_last}")
    if not t.save_final and (es or t.average_last or t.average_best):
        what = "train.early_stopping" if es else ("train.average_last" if t.average_last else "train.average_best")
        raise ConfigError(f"{what} exports its model when training ends, and train.save_final=false exports none: "
                          f"drop one of them")
    if t.average_last and not t.checkpoint_every:
        raise ConfigError("train.average_last averages checkpoints, and train.checkpoint_every=0 saves only the last: "
                          "give train.checkpoint_every")


def check_augment(a: AugmentArgs) -> None:
    """The augment section's values (its directories are read when the run is planned: asr_dist.data.augment)."""
    for kind in ("speed", "noise", "rir", "lowpass", "telephone", "gain"):
        p = getattr(a, f"{kind}_prob")
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"augment.{kind}_prob={p}: give a probability from 0 (off) to 1 (every utterance)")
    for key, lo_ok, hi_ok in (("noise_snr_db", -30, 60), ("lowpass_hz", 100, 7900), ("gain_db", -60, 40)):
        r = list(getattr(a, key))
        if len(r) != 2 or not all(isinstance(x, (int, float)) for x in r) or not lo_ok <= r[0] <= r[1] <= hi_ok:
            raise ConfigError(f"augment.{key}={r}: give [lowest, highest], within {lo_ok} to {hi_ok}")
    factors = list(a.speed_factors)
    if not factors or not all(isinstance(f, (int, float)) and 0.5 <= f <= 2.0 for f in factors):
        raise ConfigError(f"augment.speed_factors={factors}: give one or more factors from 0.5 to 2, e.g. [0.9, 1.1]")
    codecs = ("ulaw", "alaw", "gsm", "none")
    if a.telephone_codec not in codecs:
        raise ConfigError(f"augment.telephone_codec={a.telephone_codec!r}; choose one of {', '.join(codecs)}")
    for kind in ("noise", "rir"):
        if getattr(a, f"{kind}_prob") > 0 and not getattr(a, f"{kind}_dir"):
            raise ConfigError(f"augment.{kind}_prob={getattr(a, f'{kind}_prob')} needs augment.{kind}_dir: a directory "
                              f"of {'noise recordings' if kind == 'noise' else 'room impulse responses'}")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (an empty dict stays a value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def config_diff(before: dict, after: dict) -> list[str]:
    """Every key whose value differs between two configs (``to_dict`` form), as ``key: old -> new``."""
    a, b = flatten(before), flatten(after)

    def show(d: dict, k: str) -> str:
        return json.dumps(d[k]) if k in d else "unset"

    return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in sorted(set(a) | set(b))
            if k not in a or k not in b or a[k] != b[k]]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def reference_markdown() -> str:
    """The configuration reference: every key, its default and what it does, from the source."""
    import inspect
    import re

    lines = ["# Configuration reference", "",
             "Generated from `asr_dist/config.py` by `python -m asr_dist.config --markdown`; a test fails when it is stale.",
             "Set keys in the experiment YAML or on the command line as `section.key=value`.", ""]
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            src = inspect.getsource(type(default))
            lines += [f"## `{f.name}`", "", "| key | default | meaning |", "|---|---|---|"]
            for sub in dataclasses.fields(default):
                m = re.search(rf"^\s+{sub.name}:.*?#\s*(.*)$", src, re.M)
                value = getattr(default, sub.name)
                lines.append(f"| `{f.name}.{sub.name}` | `{json.dumps(value)}` | {m.group(1) if m else ''} |")
            lines.append("")
    src = inspect.getsource(Config)
    top = ["## top level", "", "| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Config):
        if f.default_factory is dataclasses.MISSING:
            m = re.search(rf"^\s+{f.name}:.*?#\s*(.*)$", src, re.M)
            d = "required" if f.default is MISSING else json.dumps(f.default)
            top.append(f"| `{f.name}` | {d} | {m.group(1) if m else ''} |")
    return "\n".join(lines[:5] + top + [""] + lines[5:])


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        print(reference_markdown())
    else:
        print(to_yaml(load_config(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:])))
