"""The reference loss curve: a tiny fixed-seed training run whose per-step losses are compared with the
curve stored in tests/assets/losses/tiny-fp32.txt (as torchtitan keeps tests/assets/losses/*.txt).

  python tests/reference_loss.py                            train, compare, print every step's difference
  python tests/reference_loss.py --refresh --why "REASON"   train and store the new curve, REASON in its header

The run: configs/test.yaml (the tiny preset, fp32, ZeRO-2, lr 1e-3) with ARGS below, one process on the
CPU (DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1), on shards of its own (tests/trainkit.py make_noise_shards:
96 utterances of speech-like noise with Danish transcripts, from numpy's generator, so the same samples in
every process): 50 optimizer steps of 8 utterances, 2 micro-batches of 4,
with SpecAugment's time masks (numpy's generator, seeded by the run) and the length plan. Every step is
logged (train.log_every=1) and read from the run's metrics.jsonl.

A curve that moves beyond TOLERANCE fails tests/test_reference_loss.py. Refresh it only for a change
that is meant to change training, and say which in --why.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # trainkit, when run as a script

from trainkit import launch, losses, make_noise_shards  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "assets" / "losses" / "tiny-fp32.txt"
STEPS = 50
GLOBAL_BATCH, MICRO_BATCH = 8, 4
# on top of configs/test.yaml: no evaluation (the curve is the training loss), a step of 8 utterances as
# 1 rank x 2 micro-batches of 4 (or 2 ranks x 1: tests/test_reference_loss.py), length plan windows of one
# step (data.bucket_batches=1), SpecAugment's time masks on
ARGS = (f"data.global_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size={MICRO_BATCH}", "data.num_workers=0",
        "data.bucket_batches=1", "data.eval_shards={}", "eval.every_steps=0", "train.checkpoint_every=0",
        "train.log_every=1", f"train.max_steps={STEPS}", "model.mask_time_prob=0.05", "model.mask_time_length=5")
# the largest relative difference |loss - reference| / reference allowed at any step. Measured on the 50
# steps: the same run twice, and on shards built again in another process, agrees to the last bit; changes
# that must not matter moved the curve by at most 2e-7 (two threads instead of one, ZeRO stage 0 instead of
# 2, batches padded to 160 samples, 2 ranks instead of 1 without SpecAugment: other summation orders, as
# another CPU's kernels take). Changes that matter move it beyond the tolerance: SpecAugment's masks one
# frame longer by up to 5.2e-3 (12 steps beyond 5e-4), lr x 1.1 by 4.4e-2 (25 steps).
TOLERANCE = 5e-4


def run_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """The reference run's overrides for the shard set under ``shards`` (make_noise_shards), writing to ``out``."""
    return [f"output_dir={out}", f"data.train_shards=[{shards / 's-train'}]", *ARGS, *extra]


def train(shards: Path, out: Path, *extra: str, launcher: str = "python") -> dict[int, float]:
    """Train the reference run (with ``extra`` overrides) and return its loss at every step."""
    r = launch(launcher, run_args(shards, out, *extra))
    if r.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{r.stderr[-3000:]}")
    return losses(out)


def read(path: Path = REFERENCE) -> dict[int, float]:
    """A stored curve: `step loss` lines after a header of `#` comments."""
    curve = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            step, loss = line.split()
            curve[int(step)] = float(loss)
    return curve


def differences(curve: dict[int, float], reference: dict[int, float]) -> list[tuple[int, float, float, float]]:
    """(step, loss, reference, relative difference) for every step of either curve (a missing step: nan)."""
    rows = []
    for step in sorted(set(curve) | set(reference)):
        a, b = curve.get(step, math.nan), reference.get(step, math.nan)
        rows.append((step, a, b, abs(a - b) / abs(b) if b else math.inf))
    return rows


def beyond(curve: dict[int, float], reference: dict[int, float], tolerance: float = TOLERANCE) -> list[str]:
    """The steps where ``curve`` is further than ``tolerance`` from ``reference`` (or missing), as lines."""
    return [f"step {s}: loss {a:.7f}, reference {b:.7f}, {100 * d:.4f} % apart"
            for s, a, b, d in differences(curve, reference) if not d <= tolerance]


def table(curve: dict[int, float], reference: dict[int, float]) -> str:
    lines = ["step       loss  reference   difference"]
    for s, a, b, d in differences(curve, reference):
        mark = "" if d <= TOLERANCE else "  beyond the tolerance"
        lines.append(f"{s:4d} {a:10.7f} {b:10.7f} {100 * d:9.5f} %{mark}")
    return "\n".join(lines)


def write(curve: dict[int, float], why: str, path: Path = REFERENCE) -> None:
    import deepspeed
    import torch
    import transformers

    header = [
        "# The reference loss curve: train/loss at every optimizer step of tests/reference_loss.py's run",
        f"# (asr-dist train --config configs/test.yaml {' '.join(ARGS)}; 1 process, CPU, fp32, OMP_NUM_THREADS=1;",
        "# shards: tests/trainkit.py make_noise_shards).",
        f"# made {datetime.date.today().isoformat()} with torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
        f"transformers {transformers.__version__}, Python {sys.version.split()[0]}",
        f"# why: {why}",
        "# step loss",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + [f"{s} {curve[s]:.7f}" for s in sorted(curve)]) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refresh", action="store_true", help="store the new curve as the reference")
    p.add_argument("--why", help="with --refresh: why training changed (written into the curve's header)")
    p.add_argument("--shards", help="a directory made by tests/trainkit.py make_noise_shards (default: made anew)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides (to see what a change does; not with --refresh)")
    args = p.parse_args(argv)
    if args.refresh and not (args.why and args.why.strip()):
        p.error("--refresh needs --why \"…\": the reason the curve changes, kept in its header")
    if args.refresh and args.overrides:
        p.error("--refresh stores the reference run itself: leave the overrides out")
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards) if args.shards else make_noise_shards(Path(tmp) / "shards")
        curve = train(shards, Path(tmp) / "run", *args.overrides)
    if args.refresh:
        old = read() if REFERENCE.exists() else {}
        write(curve, args.why.strip())
        print(table(curve, old) if old else f"wrote {len(curve)} steps to {REFERENCE}")
        return 0
    reference = read()
    print(table(curve, reference))
    bad = beyond(curve, reference)
    print(f"{len(bad)} of {len(reference)} steps beyond {100 * TOLERANCE:g} %" if bad else
          f"every step within {100 * TOLERANCE:g} % of the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
