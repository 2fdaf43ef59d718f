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
    """Rank 0's TensorBoard events ({out}/tensorboard/) and JSON lines ({out}/metrics.jsonl); a no-op
    on other ranks."""

    def __init__(self, out_dir, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            from pathlib import Path

            from torch.utils.tensorboard import SummaryWriter

            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.tb = SummaryWriter(str(out / "tensorboard"))
            self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def scalars(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        import json
        import time

        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.jsonl.flush()
        self.tb.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and text:
            self.tb.add_text(tag, text, step)

    def hparams(self, config: dict, ds_config: dict) -> None:
        if not self.enabled:
            return
        import json

        self.tb.add_text("config/experiment", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
        self.tb.add_text("config/deepspeed", "```\n" + json.dumps(ds_config, indent=1) + "\n```", 0)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
