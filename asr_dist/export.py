"""Export: a Hugging Face model directory that `transformers.pipeline("automatic-speech-recognition")`
loads unchanged: the model (fp32 safetensors, consolidated under ZeRO-3), its family's processor
(feature extractor + CTC tokenizer over the shard set's vocab.json), a model card, and
asr_dist.json with the text normaliser that made the training transcripts; after adapter-only
training also adapter.<language>.safetensors (the adapters and CTC head, for ``load_adapter``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from . import __version__
from .config import shard_dirs
from .data import index as fmt
from .errors import InvalidValue
from .evaluation import POOLED
from .text import vocab_json_bytes

log = logging.getLogger(__name__)


@contextlib.contextmanager
def whole_dir(out: Path, prefix: str = ".tmp-"):
    """A temporary directory beside ``out`` to write into: when the block ends it replaces ``out`` whole, and when
    the block raises it is removed (a reader never sees half a model directory)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def make_processor(vocab_path: Path, family=None):
    """The processor of ``family`` (wav2vec2's by default) over ``vocab_path``."""
    from .models import FAMILIES

    return (family or FAMILIES["wav2vec2"]).processor(vocab_path)


def write_processor(vocab: dict[str, int], family, out: Path) -> None:
    """The processor of ``family`` over ``vocab`` (the training set's, which may live at a URL) into ``out``."""
    (out / fmt.VOCAB_NAME).write_bytes(vocab_json_bytes(vocab))
    make_processor(out / fmt.VOCAB_NAME, family).save_pretrained(str(out))


def export(trainer, out: Path) -> None:
    """Every rank calls this (ZeRO-3 gathers the weights collectively); rank 0 writes ``out``."""
    engine = trainer.engine
    if trainer.cfg.distributed.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if not trainer.denv.is_main:
        return
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    with whole_dir(out, ".model-") as tmp:  # the export appears whole or not at all
        model = engine.module
        model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        # save_pretrained records the live module's dtype (bf16 or fp16 under mixed precision) in config.json,
        # and from_pretrained would then load the fp32 weights in that dtype: the export says float32
        config = copy.deepcopy(model.config)
        config.dtype = "float32"
        config.save_pretrained(str(tmp))
        if trainer.cfg.model.train_adapters_only:  # also the adapter alone, for load_adapter on another copy of the base
            trainer.family.write_adapter(state, model, trainer.cfg.model.adapter_language, tmp)
        write_processor(trainer.shards.vocab, trainer.family, tmp)
        (tmp / "asr_dist.json").write_text(json.dumps({
            "asr_dist_version": __version__, "text_normalizer": trainer.shards.text_normalizer,
            "train_shards": trainer.cfg.data.train_shards, "steps": engine.global_steps,
        }, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(trainer))
    log.info("exported the model to %s", out)


def model_card(trainer) -> str:
    cfg = trainer.cfg
    d = cfg.data
    sizes = ((d.micro_batch_size, d.global_batch_size) if d.micro_batch_seconds is None else
             (f"{d.micro_batch_seconds:g} s of audio", f"{d.global_batch_seconds:g} s of audio"))
    hp = [
        ("learning_rate", cfg.optim.lr), ("train_batch_size (per device)", sizes[0]),
        ("gradient_accumulation_steps", trainer.loader.accumulation), ("num_devices", trainer.world),
        ("total_train_batch_size", sizes[1]), ("seed", cfg.seed),
        ("optimizer", f"{cfg.optim.name} with betas={tuple(cfg.optim.betas)} and epsilon={cfg.optim.eps}"),
        ("lr_scheduler_type", "linear"), ("lr_scheduler_warmup_steps", cfg.optim.warmup_steps),
        ("training_steps", trainer.total_steps), ("mixed_precision_training", cfg.distributed.precision),
        ("zero_stage", cfg.distributed.zero_stage),
    ]
    # with several sets, the pooled rates (all sets as one) come last
    sets = list(trainer.evaluation.loaders) + ([POOLED] if any(f"{POOLED}_wer" in r for r in trainer.state.history) else [])
    rows = ["| Step | Training Loss | " + " | ".join(f"{n} Loss | {n} WER | {n} CER" for n in sets) + " |",
            "|---|---|" + "---|---|---|" * len(sets)]
    for r in trainer.state.history:
        cells = [str(r["step"]), "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"]
        for n in sets:
            cells += [f"{r.get(f'{n}_loss', float('nan')):.4f}", f"{r.get(f'{n}_wer', float('nan')):.4f}",
                      f"{r.get(f'{n}_cer', float('nan')):.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
    final = trainer.state.history[-1] if trainer.state.history else {}
    summary = ", ".join(f"{k.replace('_', ' ')}: {v:.4f}" for k, v in final.items() if k != "step" and v is not None)
    import deepspeed

    return f"""---
language: da
tags: [automatic-speech-recognition, {trainer.family.name}, asr-dist]
library_name: transformers
pipeline_tag: automatic-speech-recognition
---

# {Path(cfg.output_dir).name}

This model was fine-tuned with asr-dist from
{cfg.model.pretrained or f'a randomly initialised `{cfg.model.preset}` {trainer.family.name}'} on the shard set(s)
{', '.join(f'`{d}`' for d in shard_dirs(cfg.data.train_shards))} ({trainer.shards.audio_seconds / 3600:.2f} hours).

It achieves the following results on the evaluation set(s): {summary or 'no evaluation set was given'}.

Transcripts were normalised with the `{trainer.shards.text_normalizer['name']}` normaliser
({json.dumps(trainer.shards.text_normalizer['settings'])}); normalise references the same way when you
compare (`asr_dist.json` records it).

## Training hyperparameters

| hyperparameter | value |
|---|---|
""" + "\n".join(f"| {k} | {v} |" for k, v in hp) + """

## Training results

""" + "\n".join(rows) + f"""

## Framework versions

- asr-dist {__version__}
- Transformers {transformers.__version__}
- PyTorch {torch.__version__}
- DeepSpeed {deepspeed.__version__}
- Python {platform.python_version()}
"""


def _model_states(path: Path) -> Path | None:
    """DeepSpeed's model-state file of a checkpoint: mp_rank_00_… (ZeRO 0-2) or zero_pp_rank_0_… (ZeRO-3)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (path / name).exists():
            return path / name
    return None


def is_checkpoint(path: str | Path) -> bool:
    return _model_states(Path(path)) is not None


def checkpoint_state(ckpt: str | Path) -> tuple:
    """A complete training checkpoint's (config, DeepSpeed's model-state file as saved), read safely (tensors and
    plain data only); what its client state holds (history, best, step) is in the latter."""
    from omegaconf import OmegaConf

    from . import checkpoint as ckpt_mod
    from .config import Config

    ckpt = Path(ckpt)
    if not (ckpt / ckpt_mod.MARKER).exists():
        raise InvalidValue(f"{ckpt} is not a complete checkpoint (no {ckpt_mod.MARKER}: its save was cut off, or it "
                           f"is no checkpoint); give another one, or the exported {{output_dir}}/model")
    with ckpt_mod.refused_as(ckpt, InvalidValue):
        state = ckpt_mod.load_safely(_model_states(ckpt), map_location="cpu")
    if "config" not in state:
        raise InvalidValue(f"{ckpt}: no asr-dist config in it; was it written by asr-dist train?")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), state["config"])), state


def checkpoint_weights(ckpt: str | Path) -> tuple:
    """A complete training checkpoint's (config, fp32 weights, step, client state), read safely, the weights
    gathered from the ZeRO-3 partitions when needed."""
    from . import checkpoint as ckpt_mod

    ckpt = Path(ckpt)
    cfg, state = checkpoint_state(ckpt)
    weights = dict(state.get("module") or {})
    # the full shapes DeepSpeed records (trainable per parameter group, and frozen): a ZeRO-3 module holds
    # empty placeholders where they differ
    shapes = {k: tuple(v) for group in state.get("param_shapes") or [] for k, v in group.items()}
    shapes.update({k: tuple(v) for k, v in (state.get("frozen_param_shapes") or {}).items()})
    partitioned = (not weights or any(v.numel() == 0 for v in weights.values())
                   or any(k not in weights or tuple(weights[k].shape) != shape for k, shape in shapes.items()))
    if partitioned:  # ZeRO-3 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 itself loads with weights_only=False
        with ckpt_mod.refused_as(ckpt, InvalidValue), ckpt_mod.safe_torch_load():
            gathered = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        weights = {**{k: v for k, v in weights.items() if v.numel()}, **gathered}
    client = {k: v for k, v in state.items() if k in ("history", "best", "step", "epoch", "world_size")}
    return cfg, {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()}, \
        int(state.get("step", 0)), client


def write_model_dir(cfg, weights: dict, out: str | Path, record: dict, card: str | None = None) -> Path:
    """A model directory like an export's from a run config and its weights: the model rebuilt from the config,
    the processor from the training shards' vocab.json, asr_dist.json (``record`` added), and ``card``."""
    from .data.shardset import ShardSet
    from .models import build_model

    out = Path(out)
    shard_dir = str(shard_dirs(cfg.data.train_shards)[0])
    try:
        shards = ShardSet.open(shard_dir)
    except FileNotFoundError:
        raise InvalidValue(f"the run's training shards {shard_dir} (for vocab.json and the text normaliser) are gone; "
                           f"evaluate the exported model directory instead") from None
    model, family = build_model(cfg.model, shards.vocab, seed=cfg.seed)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise InvalidValue(f"{record.get('checkpoint') or record.get('averaged', {}).get('checkpoints') or 'the checkpoint'}: "
                           f"weights missing from it: {missing[:5]}")
    wrong = [k for k, v in expected.items() if weights[k].shape != v.shape]
    if wrong:
        raise InvalidValue(f"{record.get('checkpoint') or record.get('averaged', {}).get('checkpoints') or 'the checkpoint'}: "
                           f"weights of another shape than the run's model: {wrong[:5]}")
    model.load_state_dict({k: weights[k] for k in expected})
    model.config.dtype = "float32"
    model.save_pretrained(str(out), safe_serialization=True)
    if cfg.model.train_adapters_only:
        family.write_adapter(model.state_dict(), model, cfg.model.adapter_language, out)
    write_processor(shards.vocab, family, out)
    (out / "asr_dist.json").write_text(json.dumps({
        "asr_dist_version": __version__, "text_normalizer": shards.text_normalizer,
        "train_shards": cfg.data.train_shards, **record}, indent=1) + "\n")
    if card is not None:
        (out / "README.md").write_text(card)
    return out


def checkpoint_to_model_dir(ckpt: str | Path, out: str | Path) -> Path:
    """A training checkpoint ({output_dir}/checkpoints/step-N) as a model directory like an export's:
    the model rebuilt from the config saved in it, the weights from it (gathered from the ZeRO-3
    partitions when needed), the processor from the training shards' vocab.json."""
    cfg, weights, step, _ = checkpoint_weights(ckpt)
    return write_model_dir(cfg, weights, out, {"steps": step, "checkpoint": str(ckpt)})
