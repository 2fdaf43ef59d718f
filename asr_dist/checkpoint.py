"""Checkpoint directories: which are complete, which is latest, which to prune.

  {output_dir}/checkpoints/step-00000500/   DeepSpeed's files for that step (every rank writes its part)
                           step-00000500/COMPLETE   written by rank 0 after all ranks finished saving
A directory without COMPLETE (a save cut off by a kill or a full disk) is never loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def latest(ckpt_dir: Path) -> Path | None:
    done = complete_checkpoints(ckpt_dir)
    partial = [p for p in ckpt_dir.iterdir() if _TAG.match(p.name) and p not in done] if ckpt_dir.is_dir() else []
    for p in partial:
        log.warning("ignoring incomplete checkpoint %s (the save was cut off)", p)
    return done[-1] if done else None


def mark_complete(path: Path, info: dict) -> None:
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(path / MARKER)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and incomplete ones older than them."""
    done = complete_checkpoints(ckpt_dir)
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    if done:
        newest = int(_TAG.match(done[-1].name).group(1))
        for p in ckpt_dir.iterdir():
            m = _TAG.match(p.name)
            if m and not (p / MARKER).exists() and int(m.group(1)) < newest:
                shutil.rmtree(p, ignore_errors=True)


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoints pickle (loss scalers, the ZeRO stage, fragment addresses):
    allowed by name, everything else refused by torch.load(weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is not a readable PyTorch file (cut short, overwritten, another format)."""


def load_safely(path, map_location=None, *args, torch_load=None, **kw):
    """torch.load with weights_only=True: a checkpoint from elsewhere cannot run code when loaded.
    A file that torch cannot read at all raises ``DamagedCheckpoint`` naming it.
    (``torch_load``: the real torch.load, while ``safe_torch_load`` has replaced it.)"""
    import pickle

    import torch

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return (torch_load or torch.load)(path, map_location, *args, weights_only=True, **kw)
        except pickle.UnpicklingError:
            raise  # refused for safety: see refused_as
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                UnicodeDecodeError, OverflowError, MemoryError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            # weights_only's unpickler and the zip reader report damage in all of these
            raise DamagedCheckpoint(f"{path} is damaged or not a PyTorch checkpoint: "
                                    f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}") from None


@contextlib.contextmanager
def refused_as(path, error: type[Exception]):
    """Within it, a checkpoint that ``load_safely`` refuses, or finds damaged, raises ``error`` saying so,
    naming ``path`` (the checkpoint directory; the damaged file's name is in the message too)."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as e:
        raise error(f"{path} holds objects other than tensors and plain data, refused for safety "
                    f"(torch.load weights_only=True): {str(e).splitlines()[-1][:300]}") from None
    except DamagedCheckpoint as e:
        raise error(f"{e}; resume from another checkpoint (train.resume=PATH) or copy this one again") from None


@contextlib.contextmanager
def safe_torch_load():
    """Within it, every ``torch.load`` is ``load_safely`` (weights only): for library code that asks for
    weights_only=False itself, such as DeepSpeed's zero_to_fp32 gathering ZeRO-3 partitions."""
    import torch

    original = torch.load
    torch.load = lambda f, map_location=None, *args, weights_only=None, **kw: load_safely(
        f, map_location, *args, torch_load=original, **kw)
    try:
        yield
    finally:
        torch.load = original


def use_safe_loading(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints with ``load_safely`` (its own engine passes
    weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is TorchCheckpointEngine:
        ce.load = lambda path, map_location=None: load_safely(path, map_location)
    elif ce is not None:
        log.warning("DeepSpeed checkpoint engine %s: checkpoints are loaded its own way", type(ce).__name__)
