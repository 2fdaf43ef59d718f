"""Pictures for people who do not run TensorBoard: the duration histogram of a shard set, and the
training curves of a run (loss, learning rate, evaluation WER/CER per set, pooled and per group) from
its metrics.jsonl (the scalars the run logs to TensorBoard, written alongside)."""

from __future__ import annotations

import json
import re
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


GROUP_TAG = re.compile(r"^eval/(?P<set>.+?)/wer_by_(?P<field>[^/]+)/(?P<group>.+)$")


def group_panels(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{panel title: {group: [(step, WER), …]}}: one panel per evaluation set and eval.group_by field
    (the eval/SET/wer_by_FIELD/GROUP scalars), a line per group, in the order the run logged them."""
    panels: dict[str, dict[str, list]] = {}
    for r in rows:
        for k, v in r.items():
            m = GROUP_TAG.match(k)
            if m:
                title = f"{m['set']} WER by {m['field']}"
                panels.setdefault(title, {}).setdefault(m["group"], []).append((r["step"], v))
    return panels


def plot_run(run_dir: str, path: str | None = None) -> str:
    """A PNG of the run's curves; returns its path ({run_dir}/report.png unless given). First row:
    training loss, learning rate, WER/CER of each evaluation set (and pooled over the sets); below,
    one panel per set and eval.group_by field with a WER line per group."""
    plt = _pyplot()
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise PathNotFound(f"{metrics}: no such file; give the output_dir of an asr-dist train run")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise InvalidValue(f"{run_dir}/metrics.jsonl is empty: the run has not logged yet")
    # eval/SET/wer, not the per-group eval/SET/wer_by_FIELD/GROUP
    evals = sorted({k[: -len("/wer")] for r in rows for k in r
                    if k.startswith("eval/") and k.endswith("/wer") and not GROUP_TAG.match(k)})
    groups = group_panels(rows)
    ncols = 3
    nrows = 1 + -(-len(groups) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(14, 3.8 * nrows), squeeze=False)
    axes = grid[0]
    series = lambda key: [(r["step"], r[key]) for r in rows if key in r]  # noqa: E731
    for ax, key, label in ((axes[0], "train/loss", "training loss"), (axes[1], "train/lr", "learning rate")):
        pts = series(key)
        ax.plot([s for s, _ in pts], [v for _, v in pts])
        ax.set_title(label)
        ax.set_xlabel("step")
    for name in evals:
        for metric in ("wer", "cer"):
            pts = series(f"{name}/{metric}")
            axes[2].plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=f"{name[5:]} {metric.upper()}",
                         **({"color": "black", "linewidth": 2.2} if name == "eval/pooled" and metric == "wer" else {}))
    axes[2].set_title("evaluation")
    axes[2].set_xlabel("step")
    if evals:
        axes[2].legend()
    cells = [ax for row in grid[1:] for ax in row]
    for ax, (title, lines) in zip(cells, groups.items()):
        for group, pts in lines.items():
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=group)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize="small", ncol=1 + len(lines) // 8)
    for ax in cells[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = path or str(Path(run_dir) / "report.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
