"""A run's loop state at a step boundary: what a checkpoint saves and a resume restores.

  TrainState
      step            optimizer steps done (DeepSpeed's engine.global_steps, which its own checkpoint restores)
      history, best   one row per evaluation (the model card's results table); the best evaluation so far
      last_train_loss the latest logged training loss (the history's train_loss column)
      loader          this rank's TrainLoader: epoch and position in it, skipped samples, mix counts
      rng             Python's, NumPy's and torch's generators (and CUDA's) of this rank
  ──state_dict()──> this rank's part; asr_dist.checkpoint gathers every rank's into one client state
  <──load_state_dict(client, rank, world_size)── a saved client state, on the same or another number of ranks

A resume on the same number of ranks is exact: every rank continues its loader position and its random
generators. On another number, every rank takes rank 0's position (the loader re-deals the rest of the
epoch) and keeps its own generators.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": np_state[1].tolist(), "numpy_pos": int(np_state[2]),
            "torch": torch.get_rng_state().tolist(),
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))


def loader_state_for(saved: list[dict], rank: int, same_world: bool) -> dict:
    """The loader state this rank resumes from. On another number of ranks every rank starts from
    rank 0's position (the loader re-deals the rest of the epoch), and the damaged samples that all
    saved ranks skipped are counted once, on rank 0: train/skipped_samples sums them over ranks."""
    if same_world:
        return saved[rank]
    skipped = sum(s.get("skipped_samples", 0) for s in saved)
    return {**saved[0], "skipped_samples": skipped if rank == 0 else 0}


@dataclasses.dataclass
class TrainState:
    """The loop state of one rank (see the module's docstring)."""

    loader: object  # the rank's TrainLoader (state_dict / load_state_dict, epoch)
    step: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=dict)
    last_train_loss: float | None = None

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint's client state (the loop's rows are the same on every rank)."""
        return {"step": self.step, "epoch": self.loader.epoch, "history": self.history, "best": self.best,
                "last_train_loss": self.last_train_loss, "loader": self.loader.state_dict(), "rng": rng_state()}

    def load_state_dict(self, client: dict, rank: int, world_size: int) -> None:
        """Restore from a checkpoint's client state (every rank's loader and generators, as gathered at save)."""
        same_world = client["world_size"] == world_size
        self.loader.load_state_dict(loader_state_for(client["loader"], rank, same_world))
        if same_world:
            set_rng_state(client["rng"][rank])
        self.step = int(client["step"])
        self.history = list(client.get("history", []))
        self.best = dict(client.get("best", {}))
        self.last_train_loss = client.get("last_train_loss", self.history[-1].get("train_loss") if self.history else None)


# ───────────────────────────── ranking the evaluations of the history ─────────────────────────────


def ranking_key(cfg) -> tuple[str, str]:
    """The (evaluation set, metric) a run ranks its evaluations by (the best model, train.average_best, early
    stopping): train.early_stopping's, else the first evaluation set's WER."""
    spec = dict(cfg.train.early_stopping or {})
    first = next(iter(cfg.data.eval_shards), None)
    return spec.get("set") or first, spec.get("metric", "wer")


def score(row: dict, key: tuple[str, str]) -> float | None:
    """A history row's value of the ranking (set, metric); None when that evaluation lacks it."""
    value = row.get(f"{key[0]}_{key[1]}")
    return None if value is None or value != value else float(value)


def best_steps(history: list[dict], key: tuple[str, str], n: int) -> list[int]:
    """The steps of the ``n`` best evaluations (lowest first; ties to the later step)."""
    scored = [(score(r, key), int(r["step"])) for r in history if score(r, key) is not None]
    return [step for _, step in sorted(scored, key=lambda vs: (vs[0], -vs[1]))[:n]]


def early_stop(history: list[dict], cfg) -> str | None:
    """Why the run should stop now under train.early_stopping (the history's evaluations since the best one,
    improved on by no more than min_delta, reach the patience), or None. A function of the history alone, so a
    resumed run keeps the patience counted before."""
    spec = dict(cfg.train.early_stopping or {})
    if not spec:
        return None
    key = ranking_key(cfg)
    patience, delta = int(spec["patience"]), float(spec.get("min_delta", 0.0))
    best, best_step, since = None, None, 0
    for row in history:
        value = score(row, key)
        if value is None:
            continue
        if best is None or value < best - delta:
            best, best_step, since = value, int(row["step"]), 0
        else:
            since += 1
    if best is None or since < patience:
        return None
    return (f"{key[0]} {key[1].upper()} has not improved by more than {delta:g} in {since} evaluations "
            f"(train.early_stopping.patience={patience}); the best, {best:.4f}, was at step {best_step}")
