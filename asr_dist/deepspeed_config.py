"""The DeepSpeed JSON a config means on a number of ranks, and what DeepSpeed cannot do with it.

  Config ──deepspeed_config(cfg, world_size, total_steps)──> DeepSpeed JSON (micro x accumulation x world = global batch)
         ──merge_user_config──> with distributed.deepspeed_config's own JSON merged in (contradictions are errors)

Used by the engine and by `train --dry-run`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config, ConfigError
from .data.batching import accumulation_steps
from .data.shardset import LoaderError


def deepspeed_config(cfg: Config, world_size: int, total_steps: int, cuda: bool = False) -> dict:
    """The DeepSpeed JSON this config means on ``world_size`` ranks (``cuda``: the ranks train on GPUs)."""
    if cfg.distributed.precision == "auto":
        raise ValueError("distributed.precision=auto is resolved by the run's plan (asr_dist.plan.resolve_precision) "
                         "before the DeepSpeed JSON is written")
    data = cfg.data
    try:
        accumulation = accumulation_steps(data.global_batch_size, data.micro_batch_size, world_size,
                                          data.micro_batch_seconds, data.global_batch_seconds)
    except LoaderError as e:
        raise ConfigError(str(e)) from None
    # in the large-batch mode a micro-batch's utterance count varies: DeepSpeed counts micro-batches
    micro = data.micro_batch_size if data.micro_batch_seconds is None else 1
    d, o = cfg.distributed, cfg.optim
    ds = {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW" if o.name == "adamw" else "Adam",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": o.torch_adam, "adam_w_mode": o.name == "adamw"},
        },
        # DeepSpeed warms up logarithmically unless told otherwise
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"total_num_steps": total_steps, "warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                       "warmup_num_steps": min(o.warmup_steps, total_steps), "warmup_type": "linear"},
        },
        "fp16": {"enabled": d.precision == "fp16", "loss_scale": 0, "initial_scale_power": d.initial_scale_power,
                 "loss_scale_window": d.loss_scale_window, "hysteresis": d.hysteresis,
                 "min_loss_scale": d.min_loss_scale},
        "bf16": {"enabled": d.precision == "bf16"},
        "zero_optimization": {"stage": d.zero_stage, "overlap_comm": d.overlap_comm,
                              "contiguous_gradients": d.contiguous_gradients,
                              "reduce_bucket_size": d.reduce_bucket_size,
                              "allgather_bucket_size": d.allgather_bucket_size},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.zero_stage == 3:
        del ds["zero_optimization"]["allgather_bucket_size"]
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if d.deepspeed_config:
        merge_user_config(ds, d.deepspeed_config)
    # DeepSpeed's throughput timer (on unless told otherwise) synchronises the whole device when each
    # forward starts and each engine.step() ends: every micro-batch, the GPU drains its queue and waits
    # while the host fetches the next batch and launches its forward. asr-dist measures throughput
    # itself (perf/*); a user's JSON may turn the timer on again
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    params = ds["optimizer"]["params"]
    offload = (ds["zero_optimization"].get("offload_optimizer") or {}).get("device", "none")
    if offload in ("cpu", "nvme"):  # ZeRO-Offload steps on the CPU: torch's fused kernel needs CUDA tensors there,
        # and DeepSpeed's CPU Adam (built with the C++ compiler at first use, about 30 s) is the fast one
        params["torch_adam"] = False
    elif params["torch_adam"] and cuda:  # one kernel for every parameter tensor, no compilation
        params["fused"] = True
    return ds


def merge_user_config(ds: dict, path: str) -> None:
    """Add a user's DeepSpeed JSON to the generated one; any value that contradicts it is an error."""
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"distributed.deepspeed_config={path}: {e}") from None
    clashes = []

    def walk(gen: dict, usr: dict, prefix: str) -> None:
        for k, v in usr.items():
            if k not in gen:
                gen[k] = v
            elif isinstance(gen[k], dict) and isinstance(v, dict):
                walk(gen[k], v, f"{prefix}{k}.")
            elif v != "auto" and v != gen[k]:
                clashes.append(f"{prefix}{k} is {v!r} there but {gen[k]!r} from the experiment config")

    walk(ds, user, "")
    if clashes:
        raise ConfigError(f"{path} contradicts the experiment config: " + "; ".join(clashes)
                          + ". Set these in the YAML (data.*, optim.*, distributed.*) and drop them from the JSON")


def check_layerdrop(cfg: Config, world_size: int, shared_draws: bool) -> None:
    """LayerDrop on several ranks needs the skipped layers drawn alike on every rank.

    The sync-free forward takes them from ``layerdrop_draw`` (seeded by the step). transformers'
    forward draws them on each rank, so the ranks' backward passes produce gradients for different
    parameters, and DeepSpeed's ZeRO 1/2 gradient reduction issues collectives of different sizes on
    different ranks: measured with 2 gloo ranks, ZeRO 1 and 2, layerdrop 0.5, the first step dies with
    "Received data size doesn't match expected size" (on NCCL such a mismatch can hang instead).
    (ZeRO-3 is refused with LayerDrop when the config is read.)"""
    if cfg.model.layerdrop > 0 and world_size > 1 and not shared_draws:
        raise ConfigError(
            f"model.layerdrop={cfg.model.layerdrop} on {world_size} ranks with transformers' forward (model.sync_free_forward "
            f"false, or a model with an adapter): each rank would skip different layers, and DeepSpeed's gradient "
            f"reduction then mismatches between ranks (a crash or a hang). Set model.sync_free_forward=true (it skips "
            f"the same layers on every rank), model.layerdrop=0, or train on one rank")
