"""Pictures for people who do not run TensorBoard: the duration histogram of a shard set, and the
training curves of a run (loss, learning rate, evaluation WER/CER) from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InvalidValue, PathNotFound


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_durations(index: dict, path: str) -> None:
    plt = _pyplot()
    counts = index["duration_histogram"]["counts"]
    width = index["duration_histogram"]["bin_seconds"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([int(k) * width for k in counts], list(counts.values()), width=width * 0.9, align="edge")
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("utterances")
    ax.set_title(f"{index['num_samples']} utterances, {index['audio_hours']:.2f} h")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(run_dir: str, path: str | None = None) -> str:
    """A PNG of the run's curves; returns its path ({run_dir}/report.png unless given)."""
    plt = _pyplot()
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise PathNotFound(f"{metrics}: no such file; give the output_dir of an asr-dist train run")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise InvalidValue(f"{run_dir}/metrics.jsonl is empty: the run has not logged yet")
    evals = sorted({k.rsplit("/", 1)[0] for r in rows for k in r if k.startswith("eval/") and k.endswith("/wer")})
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    series = lambda key: [(r["step"], r[key]) for r in rows if key in r]  # noqa: E731
    for ax, key, label in ((axes[0], "train/loss", "training loss"), (axes[1], "train/lr", "learning rate")):
        pts = series(key)
        ax.plot([s for s, _ in pts], [v for _, v in pts])
        ax.set_title(label)
        ax.set_xlabel("step")
    for name in evals:
        for metric in ("wer", "cer"):
            pts = series(f"{name}/{metric}")
            axes[2].plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=f"{name[5:]} {metric.upper()}")
    axes[2].set_title("evaluation")
    axes[2].set_xlabel("step")
    if evals:
        axes[2].legend()
    fig.tight_layout()
    out = path or str(Path(run_dir) / "report.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
