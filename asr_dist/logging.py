"""Logging set-up: one format for every command, a rank prefix when several processes log."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int = 0, world_size: int = 1, verbose: bool = False) -> None:
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


class MetricWriter:
    """Rank 0's metrics: TensorBoard events ({out}/tensorboard/) and JSON lines ({out}/metrics.jsonl), as
    ``sinks`` (log.trackers) names them, and the trackers added with ``add`` (MLflow, W&B:
    asr_dist.trackers); a no-op on other ranks."""

    def __init__(self, out_dir, enabled: bool = True, sinks=("tensorboard", "jsonl")):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        self.trackers: list = []
        if enabled:
            from pathlib import Path

            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            if "tensorboard" in sinks:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            if "jsonl" in sinks:
                self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def add(self, trackers: list) -> None:
        self.trackers += trackers

    def _each_tracker(self, call) -> None:
        """``call(tracker)`` for each tracker; one that fails is dropped with a warning: rank 0 must not stop
        mid-run while the other ranks wait in a collective, and TensorBoard and JSON lines go on."""
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:
                logging.getLogger(__name__).warning("the %s tracker failed (%s: %s); the run goes on without it", t.name,
                                                    type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                self.trackers.remove(t)

    def scalars(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        import json
        import time

        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
            self.jsonl.flush()
        self._each_tracker(lambda t: t.scalars(step, metrics))

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and text and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def hparams(self, config: dict, ds_config: dict) -> None:
        if not self.enabled:
            return
        import json

        if self.tb is not None:
            self.tb.add_text("config/experiment", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
            self.tb.add_text("config/deepspeed", "```\n" + json.dumps(ds_config, indent=1) + "\n```", 0)
        self._each_tracker(lambda t: t.params({**config, "deepspeed": ds_config}))

    def artifact(self, path, folder: str | None = None) -> None:
        """A file the trackers keep with the run (the model card, evaluation reports)."""
        from pathlib import Path

        if self.enabled and Path(path).exists():
            self._each_tracker(lambda t: t.artifact(Path(path), folder))

    def close(self, status: str = "FINISHED") -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close(status)
            except Exception as e:  # a tracker that fails to close loses nothing the run wrote itself
                logging.getLogger(__name__).warning("could not close the %s run: %s", t.name, e)
