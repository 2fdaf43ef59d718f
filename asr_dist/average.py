"""Checkpoint averaging: the element-wise mean of several checkpoints' weights, exported as one model.

  checkpoints: given, or a run's last N, or its best N by an evaluation metric (the run's history, kept in
  its newest checkpoint) ──checkpoint_weights (read safely; ZeRO-3 partitions gathered)──> fp32 weights
  ──mean of every floating-point tensor (integer buffers from the newest)──> a model directory like an export's
  (model card and asr_dist.json say what was averaged)

ESPnet (``--avg N``, ``keep_nbest_models``), icefall and NeMo average the last or best checkpoints before
export: a lower WER at no training cost, most of all after a noisy end of training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import CHECKPOINTS, complete_checkpoints
from .errors import InvalidValue
from .export import checkpoint_state, checkpoint_weights, whole_dir, write_model_dir
from .state import best_steps, ranking_key, score

log = logging.getLogger(__name__)


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run (an output_dir, or its checkpoints/ directory), oldest first."""
    run = Path(run_dir)
    found = complete_checkpoints(run / CHECKPOINTS) or complete_checkpoints(run)
    if not found:
        raise InvalidValue(f"{run_dir}: no complete checkpoints in {run / 'checkpoints'}; give a training output_dir "
                           f"whose run saved some (train.checkpoint_every), or --checkpoints DIR …")
    return found


def best_checkpoints(run_dir: str | Path, n: int, set_name: str | None = None, metric: str | None = None
                     ) -> tuple[list[Path], str]:
    """The ``n`` checkpoints of a run with the lowest ``metric`` on ``set_name`` (default: what the run ranks by),
    among those saved at an evaluation; and a description of the choice."""
    found = run_checkpoints(run_dir)
    cfg, client = checkpoint_state(found[-1])  # its config and history; no weights needed
    default_set, default_metric = ranking_key(cfg)
    set_name, metric = set_name or default_set, metric or default_metric
    key = (set_name, metric)
    saved = {int(p.name.split("-")[1]): p for p in found}
    rows = [r for r in client.get("history", []) if int(r["step"]) in saved]
    if not any(score(r, key) is not None for r in client.get("history", [])):
        raise InvalidValue(f"{run_dir}: its history has no {metric} on evaluation set {set_name!r}; name one of its "
                           f"sets (--set), or average the last checkpoints (--last N)")
    steps = best_steps(rows, key, n)
    if len(steps) < n:
        raise InvalidValue(f"{run_dir}: {len(steps)} checkpoints were saved at an evaluation, fewer than --best {n}: "
                           f"train with train.average_best={n} (it keeps the best checkpoints), or average fewer")
    values = {int(r["step"]): score(r, key) for r in rows}
    steps.sort()
    what = f"the best {n} by {set_name} {metric.upper()} ({', '.join(f'{values[s]:.4f}' for s in steps)})"
    return [saved[s] for s in steps], what


def last_checkpoints(run_dir: str | Path, n: int) -> tuple[list[Path], str]:
    found = run_checkpoints(run_dir)
    if len(found) < n:
        raise InvalidValue(f"{run_dir}: {len(found)} complete checkpoints, fewer than --last {n}: keep more "
                           f"(train.keep_checkpoints) or average fewer")
    return found[-n:], f"the last {n}"


def average_weights(paths: list[Path]) -> tuple:
    """(config of the newest, the element-wise mean of the weights, steps) of ``paths``; every checkpoint must
    hold the same tensors."""
    if not paths:
        raise InvalidValue("no checkpoints to average")
    total, steps, cfg = None, [], None
    for path in paths:
        cfg_i, weights, step, _ = checkpoint_weights(path)
        steps.append(step)
        if total is None:
            cfg, total, first = cfg_i, {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in weights.items()}, path
            continue
        if set(weights) != set(total) or any(weights[k].shape != total[k].shape for k in total):
            raise InvalidValue(f"{path} holds other tensors than {first}: checkpoints of different models cannot be "
                               f"averaged")
        for k, v in weights.items():
            if v.is_floating_point():
                total[k] += v.to(torch.float64)
            else:
                total[k] = v  # integer buffers (counters): the newest's
        cfg = cfg_i
    mean = {k: (v / len(paths)).to(torch.float32) if v.is_floating_point() else v for k, v in total.items()}
    return cfg, mean, steps


def averaged_card(steps: list[int], what: str) -> str:
    return (f"\n## Checkpoint averaging\n\nThe weights are the element-wise mean of {len(steps)} checkpoints, "
            f"{what}: steps {', '.join(map(str, steps))}.\n")


def average(paths: list[Path], out: str | Path, what: str = "as given", card: str | None = None) -> Path:
    """Average ``paths`` into the model directory ``out`` (replaced whole), with a model card (``card``, or a
    short one) that says what was averaged."""
    cfg, mean, steps = average_weights(paths)
    out = Path(out)
    card = (card or f"---\ntags: [automatic-speech-recognition, asr-dist]\nlibrary_name: transformers\n"
                    f"pipeline_tag: automatic-speech-recognition\n---\n\n# {Path(cfg.output_dir).name} (averaged)\n"
            ) + averaged_card(steps, what)
    record = {"steps": max(steps), "averaged": {"checkpoints": [str(p) for p in paths], "steps": steps, "which": what}}
    with whole_dir(out, ".averaged-") as tmp:
        write_model_dir(cfg, mean, tmp, record, card)
    log.info("averaged %d checkpoints (%s) into %s", len(paths), what, out)
    return out

