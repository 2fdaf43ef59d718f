"""Experiment trackers beside TensorBoard and JSON lines: MLflow and Weights & Biases.

  log.trackers: [tensorboard, jsonl, mlflow, wandb]
  ──check_trackers (at config time: known names, packages installed, settings)──>
  ──start_trackers (rank 0, after the process group: a tracker that cannot start stops every rank)──>
  asr_dist.logging.MetricWriter: every scalar TensorBoard gets, the resolved config as parameters, and
  the model card and evaluation reports as artifacts

Only rank 0 logs. Credentials come from the environment (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, …), never
from the YAML. W&B runs offline by default: no network is needed, and `wandb sync DIR` uploads the run later.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

from .config import flatten
from .errors import UserError

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "jsonl", "mlflow", "wandb")
PACKAGES = {"mlflow": ("mlflow", "pip install 'asr-dist[trackers]' (or mlflow-skinny)"),
            "wandb": ("wandb", "pip install 'asr-dist[trackers]' (or wandb)")}


class TrackerError(UserError, RuntimeError):
    """A tracker that cannot start: the message says why and what to install or change."""


def check_trackers(args) -> None:
    """log.trackers and their settings, and that each tracker's package is installed (before any work)."""
    names = list(args.trackers)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or len(set(names)) != len(names):
        raise TrackerError(f"log.trackers={names}: give distinct names from {', '.join(TRACKERS)}")
    for name in names:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            raise TrackerError(f"log.trackers has {name}, and the {PACKAGES[name][0]} package is not installed: "
                               f"{PACKAGES[name][1]}; or leave {name} out of log.trackers")
    if args.wandb_mode not in ("offline", "online"):
        raise TrackerError(f"log.wandb_mode={args.wandb_mode!r}; choose offline (no network; `wandb sync` later) or "
                           f"online (the API key from WANDB_API_KEY)")


class MlflowTracker:
    """An MLflow run: in log.mlflow_tracking_uri (default: MLFLOW_TRACKING_URI, else a file store in
    {output_dir}/mlruns), experiment log.mlflow_experiment; a resumed run goes on in the same MLflow run."""

    name = "mlflow"

    def __init__(self, args, out: Path, run_name: str):
        import mlflow

        uri = args.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it still reads and writes, and
            # needs no database packages (sqlite:///… is the database alternative, with sqlalchemy installed)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        try:
            self.client = mlflow.tracking.MlflowClient(uri)
            experiment = self.client.get_experiment_by_name(args.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(args.mlflow_experiment))
            marker = out / ".mlflow_run_id"
            run_id = marker.read_text().strip() if marker.exists() else None
            if run_id:
                try:
                    self.client.get_run(run_id)
                except Exception:
                    run_id = None
            if not run_id:
                run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
                marker.write_text(run_id + "\n")
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as e:
            raise TrackerError(f"MLflow at {uri} does not answer: {type(e).__name__}: {str(e).splitlines()[0][:300]}; "
                               f"check log.mlflow_tracking_uri (or MLFLOW_TRACKING_URI) and its credentials") from None
        self.run_id = run_id
        log.info("MLflow: run %s in experiment %r at %s", run_id, args.mlflow_experiment, uri)

    @staticmethod
    def metric_name(name: str) -> str:
        """``name`` in the characters MLflow takes (letters, digits, _ - . / and space): a group value such as
        "other (unknown)" would be refused."""
        return re.sub(r"[^\w\-./ ]", "_", name)

    def scalars(self, step: int, metrics: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(self.metric_name(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000], synchronous=True)

    def params(self, config: dict) -> None:
        from mlflow.entities import Param

        flat = flatten(config)
        try:
            logged = self.client.get_run(self.run_id).data.params
        except Exception:
            logged = {}
        # a parameter cannot change in MLflow: a resumed run with another value logs it under a new name
        rows = []
        for k, v in sorted(flat.items()):
            value, name, n = str(v)[:6000], k, 1
            while name in logged and logged[name] != value:  # key@resumed, key@resumed2, …: the first free one
                name, n = f"{k}@resumed{n if n > 1 else ''}", n + 1
            if logged.get(name) != value:
                rows.append(Param(name, value))
        for i in range(0, len(rows), 100):  # at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=rows[i:i + 100], synchronous=True)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class WandbTracker:
    """A W&B run in {output_dir}/wandb (log.wandb_project; offline unless log.wandb_mode=online); a resumed run
    goes on in the same W&B run."""

    name = "wandb"

    def __init__(self, args, out: Path, run_name: str):
        import wandb

        marker = out / ".wandb_run_id"
        import secrets

        run_id = marker.read_text().strip() if marker.exists() else secrets.token_hex(4)
        marker.write_text(run_id + "\n")
        try:
            self.run = wandb.init(project=args.wandb_project, name=run_name, id=run_id, resume="allow",
                                  dir=str(out), mode=args.wandb_mode, reinit="create_new")
        except Exception as e:
            raise TrackerError(f"W&B could not start ({type(e).__name__}: {str(e).splitlines()[0][:300]}); with "
                               f"log.wandb_mode=online the API key comes from WANDB_API_KEY; or use "
                               f"log.wandb_mode=offline and `wandb sync` later") from None
        log.info("W&B: run %s (%s) in %s", run_id, args.wandb_mode, self.run.dir)

    def scalars(self, step: int, metrics: dict) -> None:
        self.run.log(dict(metrics), step=step)

    def params(self, config: dict) -> None:
        self.run.config.update(flatten(config), allow_val_change=True)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        import wandb

        art = wandb.Artifact(f"{(folder or 'files').replace('/', '-')}-{path.stem}", type=folder or "file")
        art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def start_trackers(args, out: Path) -> list:
    """The trackers of log.trackers beyond TensorBoard and JSON lines, started (rank 0 only)."""
    run_name = args.run_name or out.resolve().name
    made = []
    try:
        for name in args.trackers:
            if name == "mlflow":
                made.append(MlflowTracker(args, out, run_name))
            elif name == "wandb":
                made.append(WandbTracker(args, out, run_name))
    except BaseException:
        for t in made:
            t.close("FAILED")
        raise
    return made
