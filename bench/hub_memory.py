#!/usr/bin/env python3
"""Peak memory of `asr-dist shards build` on a Hugging Face Hub-layout parquet corpus, against its size.

Input: data/train-*.parquet with embedded 48 kHz 16-bit WAV (tone plus noise, which compresses badly,
so the bytes are those of real audio), 100 rows per row group as `datasets` writes audio; output:
16 kHz FLAC shards. Each size is built in a fresh process; its peak resident memory (ru_maxrss, the
largest of it and its workers) is read from wait4. Flat figures across sizes mean the builder holds
row groups, not the corpus. The corpora are written by another child process, and this parent
imports only the standard library: a forked child's peak counts the parent's pages until it execs.

  python bench/hub_memory.py [--sizes-mb 100 400] [--workers 1]   -> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RATE, SECONDS, ROWS_PER_GROUP, ROWS_PER_FILE = 48000, 8.0, 100, 500


def write_repo(root: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """A repository of about ``megabytes`` of parquet; returns (rows, bytes on disk)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    from asr_dist.synth import danish_sentences

    rng = np.random.default_rng(seed)
    words = " ".join(danish_sentences()).replace(".", "").replace(",", "").split()
    pick = random.Random(seed)
    (root / "data").mkdir(parents=True)
    n = int(megabytes * 1e6 / (RATE * SECONDS * 2 + 44))
    t = np.arange(int(RATE * SECONDS)) / RATE
    schema = pa.schema([("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string()),
                        ("gender", pa.string())])
    num_files = -(-n // ROWS_PER_FILE)
    for f in range(num_files):
        rows = []
        for i in range(f * ROWS_PER_FILE, min(n, (f + 1) * ROWS_PER_FILE)):
            x = 0.3 * np.sin(2 * np.pi * (120 + i % 200) * t) + 0.05 * rng.standard_normal(t.size)
            buf = io.BytesIO()
            sf.write(buf, x.astype(np.float32), RATE, format="WAV", subtype="PCM_16")
            rows.append({"audio": {"bytes": buf.getvalue(), "path": f"utt{i:06d}.wav"},
                         "text": " ".join(pick.choice(words) for _ in range(8)), "gender": "fm"[i % 2]})
        pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                       root / "data" / f"train-{f:05d}-of-{num_files:05d}.parquet", row_group_size=ROWS_PER_GROUP)
    return n, sum(p.stat().st_size for p in (root / "data").iterdir())


def peak_build(repo: Path, out: Path, workers: int) -> tuple[float, float, dict]:
    """(peak RSS in MB, wall seconds, index.json) of one build in a fresh process."""
    cmd = [sys.executable, "-m", "asr_dist.cli", "shards", "build", "-i", str(repo), "-o", str(out), "-j", str(workers),
           "--no-progress", "--max-duration", "30"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, wall, json.loads((out / "index.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 400])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--write", nargs=3, metavar=("DIR", "MB", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        print(json.dumps(write_repo(Path(args.write[0]), float(args.write[1]), int(args.write[2]))))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, mb in enumerate(args.sizes_mb):
            repo = Path(tmp) / f"repo{i}"
            rows, size = json.loads(subprocess.run([sys.executable, __file__, "--write", str(repo), str(mb), str(i)],
                                                   check=True, capture_output=True, text=True).stdout)
            rss, wall, index = peak_build(repo, Path(tmp) / f"out{i}", args.workers)
            runs.append({"parquet_mb": round(size / 1e6, 1), "rows": rows, "row_group_rows": ROWS_PER_GROUP,
                         "row_group_mb": round(ROWS_PER_GROUP * RATE * SECONDS * 2 / 1e6, 1),
                         "audio_hours": index["audio_hours"], "peak_rss_mb": round(rss, 1), "wall_s": round(wall, 1)})
    print(json.dumps({"benchmark": "hub_build_peak_memory", "workers": args.workers, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
