"""Checkpoint directories: which are complete, which is latest, which to prune.

  {output_dir}/checkpoints/step-00000500/   DeepSpeed's files for that step (every rank writes its part)
                           step-00000500/COMPLETE   written by rank 0 after all ranks finished saving
A directory without COMPLETE (a save cut off by a kill or a full disk) is never loaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from . import __version__
from .config import to_dict
from .errors import TrainingError
from .state import best_steps, ranking_key

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
CHECKPOINTS = "checkpoints"  # the checkpoints' directory in output_dir
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


def prune(ckpt_dir: Path, keep: int, protect: tuple[int, ...] = ()) -> None:
    """Delete all but the ``keep`` newest complete checkpoints and those of the steps in ``protect`` (the best,
    for train.average_best), and incomplete ones older than them."""
    done = complete_checkpoints(ckpt_dir)
    for p in done[:-keep] if keep > 0 else []:
        if int(_TAG.match(p.name).group(1)) not in protect:
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


# ───────────────────────────── state that travels with a checkpoint ─────────────────────────────


def gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """A run's saves and its resume: DeepSpeed's checkpoint of every rank, plus the client state exact
    resume needs: the TrainState of every rank (step, history and best, loader position, random generators),
    the world size and the config."""

    def __init__(self, engine, state, denv, cfg):
        self.engine, self.state, self.cfg = engine, state, cfg
        self.rank, self.world, self.is_main = denv.rank, denv.world_size, denv.is_main
        self.dir = Path(cfg.output_dir) / CHECKPOINTS

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def is_latest(self, step: int) -> bool:
        """Whether the latest complete checkpoint is of ``step`` (a save there would repeat it)."""
        last = latest(self.dir)
        return last is not None and last.name == tag_for(step)

    def to_resume(self) -> Path | None:
        """The checkpoint train.resume names (auto: the latest complete one), or None for a fresh start."""
        mode = self.cfg.train.resume
        if mode == "never":
            return None
        path = Path(mode) if mode != "auto" else latest(self.dir)
        if path is not None and not (path / MARKER).exists():
            raise TrainingError(f"{path} is not a complete checkpoint (no {MARKER}); give another train.resume")
        return path

    def resume(self) -> dict | None:
        """Load train.resume into the engine and the TrainState; the client state it saved (its config, …),
        or None when there is nothing to resume."""
        path = self.to_resume()
        if path is None:
            return None
        with refused_as(path, TrainingError):
            _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if client is None:
            raise TrainingError(f"DeepSpeed could not load {path}")
        self.state.load_state_dict(client, self.rank, self.world)
        if self.state.step != self.engine.global_steps:
            raise TrainingError(f"{path}: its client state says step {self.state.step} but DeepSpeed's state step "
                                f"{self.engine.global_steps}; the checkpoint is inconsistent: resume from another one")
        log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)
        return client

    def save(self, step: int) -> Path:
        """Save step ``step`` on every rank, with the client state exact resume needs; mark it complete once
        all ranks are done, and prune the oldest beyond train.keep_checkpoints."""
        tag = tag_for(step)
        mine = self.state.state_dict()
        client = {
            "step": step, "epoch": mine["epoch"], "world_size": self.world,
            "loader": gather(mine["loader"], self.world),
            "rng": gather(mine["rng"], self.world),
            "history": mine["history"], "best": mine["best"], "last_train_loss": mine["last_train_loss"],
            "config": to_dict(self.cfg), "asr_dist_version": __version__,
        }
        path = self.dir / tag
        if self.is_main and path.exists():
            # a save of this step cut off before (a resumed run reaches it again): its files would mix
            # with the new ones (another world size leaves extra partitions that the loader then reads)
            log.warning("removing %s, left by an earlier save of step %d, before saving it again", path, step)
            shutil.rmtree(path)
        self.barrier()
        try:
            self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=False)
        except (OSError, RuntimeError) as e:
            self._save_failed(path, e)
        self.barrier()
        if self.is_main:
            try:
                mark_complete(path, {"step": step, "world_size": self.world})
            except OSError as e:
                self._save_failed(path, e)
            protect = (best_steps(self.state.history, ranking_key(self.cfg), self.cfg.train.average_best)
                       if self.cfg.train.average_best else ())
            prune(self.dir, self.cfg.train.keep_checkpoints, tuple(protect))
        self.barrier()
        log.info("saved checkpoint %s", path)
        return path

    def _save_failed(self, path: Path, e: Exception) -> None:
        """A save that failed (most often a full disk): remove what was written, keep every earlier
        checkpoint, and stop with what to do."""
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        prev = latest(self.dir)
        try:  # torch reports a full disk as e.g. "unexpected pos …": judge by the space left
            free = shutil.disk_usage(self.dir).free
            needed = sum(f.stat().st_size for f in prev.iterdir()) // max(1, self.world) if prev else 64 * 2**20
        except OSError:
            free, needed = None, 0
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (free is not None and free < needed):
            why = f"no space left on the device ({free / 2**20:.1f} MiB free in {self.dir}); {why}"
        if self.is_main:
            shutil.rmtree(path, ignore_errors=True)
        raise TrainingError(
            f"rank {self.rank} could not save checkpoint {path}: {why}. The partial checkpoint was removed; "
            + (f"{prev} is intact. " if prev else "there is no earlier checkpoint. ")
            + "Free space (or lower train.keep_checkpoints, or move output_dir) and run the same command again to "
            "resume" + (f" from step {int(prev.name.split('-')[1])}" if prev else "")) from e
