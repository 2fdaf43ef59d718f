#!/usr/bin/env python3
"""Seeded mutation fuzzing of every reader of outside input.

  seed files (real: encoded by libsndfile, written by the shard writer, torch.save, synthesised corpora)
    └─ case i of target T: random.Random(f"{seed}-{T}-{i}") picks a seed file and 1-4 mutations
       (bit flips, random or boundary bytes such as 0xFFFFFFFF at any offset, cuts, inserts,
       duplicated chunks, truncation, line shuffles, text splices)
    └─ a worker process runs the target's reader on it; every case must end in
         success | the project's own error naming the input   (counted)
       and never in another exception, a hang (--timeout per case: the worker is killed and
       replaced) or a memory blow-up (--max-rss-growth per case)

    python bench/fuzz.py --cases 10000            # every target; prints the table, then one JSON line
    python bench/fuzz.py --targets audio-flac,index-json --cases 500 --save-failures DIR

A failing case is written to --save-failures as TARGET-CASE.bin with its traceback: keep it as a
regression input (tests/fuzz/).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**31 - 1,
               2**32 - 1, 2**36, 2**63 - 1]
TEXT_SPLICES = ["\t", "\n", "\r", "\x00", "|", "..", "../", "/", "\"", "'", "{", "}", "[", "]", ":", "-", "=",
                "1e999", "NaN", "-1", "99999999999999999999", "\xff", "é", "\u202e", " ", "null", "true", ",",
                "*", "${x}", "!!python/object:os.system", "&a", "<<: *a", "~", "%"]


# ───────────────────────────── mutations ─────────────────────────────


def mutate(data: bytes, rng: random.Random, text: bool) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9 if text else 7)
        pos = rng.randrange(len(b) + 1) if b else 0
        if op == 0 and b:  # flip bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # random bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:  # a boundary integer, little or big endian, 1-8 bytes
            n = rng.choice((1, 2, 4, 8))
            v = rng.choice(INTERESTING) & ((1 << (8 * n)) - 1)
            b[pos:pos + n] = v.to_bytes(n, rng.choice(("little", "big")))
        elif op == 3 and b:  # cut a chunk
            del b[pos:pos + rng.randint(1, max(1, len(b) // 8))]
        elif op == 4:  # insert random bytes
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif op == 5 and b:  # duplicate a chunk elsewhere
            a = rng.randrange(len(b))
            chunk = b[a:a + rng.randint(1, 512)]
            b[pos:pos] = chunk
        elif op == 6:  # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op == 7:  # splice a special string
            b[pos:pos] = rng.choice(TEXT_SPLICES).encode("utf-8", "surrogatepass")
        elif op == 8:  # swap, drop or repeat lines
            lines = bytes(b).split(b"\n")
            i = rng.randrange(len(lines))
            choice = rng.randrange(3)
            if choice == 0:
                j = rng.randrange(len(lines))
                lines[i], lines[j] = lines[j], lines[i]
            elif choice == 1:
                del lines[i]
            else:
                lines.insert(i, lines[i])
            b = bytearray(b"\n".join(lines))
    return bytes(b)


# ───────────────────────────── seeds ─────────────────────────────


def _tone(seconds: float, sr: int):
    import numpy as np

    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype("float32")


def make_seeds(root: Path) -> dict[str, dict]:
    """Real seed files for every target, written under ``root``."""
    import soundfile as sf
    import torch

    from asr_dist.audio import encode
    from asr_dist.data import index as fmt
    from asr_dist.data.writer import BuildOptions, build
    from asr_dist.synth import write_corpus

    seeds: dict[str, dict] = {}
    for name, (container, subtype, sr) in {"wav": ("WAV", "PCM_16", 22050), "flac": ("FLAC", "PCM_16", 16000),
                                            "ogg": ("OGG", "VORBIS", 16000), "mp3": ("MP3", "MPEG_LAYER_III", 16000)}.items():
        buf = io.BytesIO()
        sf.write(buf, _tone(0.6, sr), sr, format=container, subtype=subtype)
        seeds[f"audio-{name}"] = {"files": [buf.getvalue()]}
    corpora = root / "corpora"
    paths = {layout: Path(write_corpus(corpora / layout, layout, 3, seed=1)) for layout in
             ("commonvoice", "nemo", "audiofolder", "kaldi")}
    seeds["manifest-cv-tsv"] = {"files": [paths["commonvoice"].read_bytes()], "dir": paths["commonvoice"].parent,
                                "name": paths["commonvoice"].name, "format": "commonvoice"}
    seeds["manifest-nemo-jsonl"] = {"files": [paths["nemo"].read_bytes()], "dir": paths["nemo"].parent,
                                    "name": paths["nemo"].name, "format": "nemo"}
    af = paths["audiofolder"]
    csv_meta = next(af.rglob("metadata.csv"), None) or next(af.rglob("metadata.jsonl"))
    seeds["manifest-audiofolder"] = {"files": [csv_meta.read_bytes()], "dir": af,
                                     "name": str(csv_meta.relative_to(af)), "format": "audiofolder"}
    kd = paths["kaldi"]
    (kd / "segments").write_text("".join(f"{line.split()[0]} {line.split()[0]} 0.0 0.5\n"
                                         for line in (kd / "wav.scp").read_text().splitlines()))
    seeds["manifest-kaldi"] = {"files": [(kd / n).read_bytes() for n in ("wav.scp", "text", "segments")],
                               "names": ["wav.scp", "text", "segments"], "dir": kd, "format": "kaldi"}
    shards = root / "shards"
    build(BuildOptions(inputs=[str(paths["commonvoice"])], output=str(shards), shard_size=2, progress=False,
                       max_reject_fraction=1, min_duration=0.1))
    tars = sorted(shards.glob("shard-*.tar"))
    seeds["shard-tar"] = {"files": [p.read_bytes() for p in tars], "text": False}
    seeds["index-json"] = {"files": [(shards / fmt.INDEX_NAME).read_bytes()], "dir": shards, "text": True}
    seeds["vocab-json"] = {"files": [(shards / fmt.VOCAB_NAME).read_bytes()], "dir": shards, "text": True}
    repo = Path(__file__).resolve().parents[1]
    seeds["config-yaml"] = {"files": [(repo / "configs" / "test.yaml").read_bytes()], "text": True}
    seeds["config-override"] = {"files": [o.encode() for o in (
        "train.max_steps=100", "data.train_shards=[a,b]", "optim.betas=[0.9,0.98]", "data.eval_shards={}",
        "model.preset=tiny", "distributed.precision=bf16", "data.micro_batch_seconds=30")], "text": True}
    from asr_dist.config import ModelArgs
    from asr_dist.models import build_model

    model, _ = build_model(ModelArgs(preset="tiny"), json.loads((shards / fmt.VOCAB_NAME).read_text()), seed=0)
    buf = io.BytesIO()
    torch.save({"module": {k: v for i, (k, v) in enumerate(model.state_dict().items()) if i < 6},
                "step": 3, "config": {"seed": 0}, "history": [{"step": 2, "wer": 0.5}]}, buf)
    seeds["checkpoint"] = {"files": [buf.getvalue()]}
    for name, s in seeds.items():
        s.setdefault("text", name.startswith(("manifest", "index", "vocab", "config")))
    return seeds


# ───────────────────────────── targets ─────────────────────────────


@dataclasses.dataclass
class Target:
    name: str
    run: Callable[[bytes, dict, Path], None]  # raises the project's error, or returns
    clear: tuple  # the project's error types
    names_input: bool = True  # a clear error must name the input's file


def _audio(data: bytes, seed: dict, work: Path) -> None:
    from asr_dist.audio import decode, probe

    probe(data)
    decode(data)


def _shard(data: bytes, seed: dict, work: Path) -> None:
    from asr_dist.data import index as fmt
    from asr_dist.data.samples import decode_audio

    path = work / "shard-000000.tar"
    path.write_bytes(data)
    for key, files in fmt.iter_shard(path, data):
        if "flac" in files:
            decode_audio(files["flac"], f"{path} sample {key}")
    fmt.list_shard(path)


def _shard_dir(work: Path, seed: dict, name: str, data: bytes) -> Path:
    d = work / "set"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    for f in seed["dir"].iterdir():
        if f.suffix in (".json",):
            shutil.copy(f, d / f.name)
    (d / name).write_bytes(data)
    return d


def _index(data: bytes, seed: dict, work: Path) -> None:
    from asr_dist.data.shardset import ShardSet

    ShardSet.open(str(_shard_dir(work, seed, "index.json", data)))


def _vocab(data: bytes, seed: dict, work: Path) -> None:
    from asr_dist.data.shardset import ShardSet

    ShardSet.open(str(_shard_dir(work, seed, "vocab.json", data)))


def _manifest(data: bytes, seed: dict, work: Path) -> None:
    from asr_dist.data.sources import read_input, resolve_input

    d = work / "corpus"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(seed["dir"], d)
    name = seed["names"][seed["which"]] if "names" in seed else seed["name"]
    (d / name).write_bytes(data)
    path = d if seed["format"] in ("kaldi", "audiofolder") else d / name
    for _ in read_input(resolve_input(str(path), seed["format"])):
        pass


def _config(data: bytes, seed: dict, work: Path) -> None:
    from asr_dist.config import load_config

    path = work / "c.yaml"
    path.write_bytes(data)
    load_config(str(path), [])


def _override(data: bytes, seed: dict, work: Path) -> None:
    from asr_dist.config import load_config

    repo = Path(__file__).resolve().parents[1]
    load_config(str(repo / "configs" / "test.yaml"), [data.decode("utf-8", "surrogateescape")])


def _checkpoint(data: bytes, seed: dict, work: Path) -> None:
    from asr_dist import checkpoint as ckpt

    path = work / "mp_rank_00_model_states.pt"
    path.write_bytes(data)
    with ckpt.refused_as(path, ValueError):
        ckpt.load_safely(path, map_location="cpu")


def targets() -> dict[str, Target]:
    from asr_dist.audio import AudioError
    from asr_dist.config import ConfigError
    from asr_dist.data.index import ShardError
    from asr_dist.data.shardset import LoaderError
    from asr_dist.data.items import InputError

    t = [Target(f"audio-{n}", _audio, (AudioError,), names_input=False) for n in ("wav", "flac", "ogg", "mp3")]
    t += [Target("shard-tar", _shard, (ShardError,)),
          Target("index-json", _index, (LoaderError, ShardError, ValueError)),
          Target("vocab-json", _vocab, (LoaderError, ShardError, ValueError))]
    t += [Target(n, _manifest, (InputError,)) for n in
          ("manifest-cv-tsv", "manifest-nemo-jsonl", "manifest-audiofolder", "manifest-kaldi")]
    t += [Target("config-yaml", _config, (ConfigError,), names_input=False),  # validation names the key
          Target("config-override", _override, (ConfigError,), names_input=False),
          Target("checkpoint", _checkpoint, (ValueError,))]
    return {x.name: x for x in t}


# ───────────────────────────── the worker and the campaign ─────────────────────────────


def classify(target: Target, data: bytes, seed: dict, work: Path) -> tuple[str, str]:
    """("success" | "clear" | "other", detail) of one input."""
    try:
        target.run(data, seed, work)
    except target.clear as e:
        text = str(e)
        if target.names_input and not any(str(p) in text for p in (work, "index.json", "vocab.json")):
            return "other", f"{type(e).__name__} without the input's name: {text[:300]}"
        return "clear", text[:300]
    except BaseException as e:  # noqa: BLE001 - the campaign counts whatever escapes
        return "other", "".join(traceback.format_exception(type(e), e, e.__traceback__))[-2000:]
    return "success", ""


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(conn, name: str, seeds_root: str, seed: int) -> None:
    import logging

    logging.disable(logging.CRITICAL)  # rejects and warnings are the readers' normal output
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # libmpg123 & co. print their complaints on stderr, case after case
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    target = targets()[name]
    seeds = make_seeds_cached(Path(seeds_root))[name]
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    try:
        while True:
            i = conn.recv()
            if i is None:
                return
            data, s = case(name, seeds, seed, i)
            before = _rss_mib()
            outcome, detail = classify(target, data, s, work)
            conn.send((outcome, detail, before, _rss_mib()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


_SEEDS: dict = {}


def make_seeds_cached(root: Path) -> dict:
    """The seeds of ``root``, made once per process (workers fork after the campaign made them)."""
    key = str(root)
    if key not in _SEEDS:
        _SEEDS[key] = make_seeds(root)
    return _SEEDS[key]


def case(name: str, seeds: dict, seed: int, i: int) -> tuple[bytes, dict]:
    """Case ``i`` of a target: the mutated bytes and the seed description (which file of it)."""
    rng = random.Random(f"{seed}-{name}-{i}")
    which = rng.randrange(len(seeds["files"]))
    return mutate(seeds["files"][which], rng, seeds["text"]), {**seeds, "which": which}


@dataclasses.dataclass
class Row:
    target: str
    cases: int = 0
    success: int = 0
    clear: int = 0
    other: int = 0
    hang: int = 0
    memory: int = 0
    peak_rss_mib: float = 0.0
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)  # (case, outcome, detail)


def run_target(name: str, cases: int, seeds_root: Path, seed: int = 0, timeout: float = 10.0,
               max_rss_growth_mib: float = 512.0, save: Path | None = None, first: int = 0) -> Row:
    ctx = multiprocessing.get_context("fork")
    row = Row(name)
    t0 = time.time()
    proc = conn = None

    def start():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, name, str(seeds_root), seed), daemon=True)
        p.start()
        return p, parent

    for i in range(first, first + cases):
        if proc is None:
            proc, conn = start()
        conn.send(i)
        # the first case of a worker also imports the readers and loads the seeds
        if not conn.poll(timeout + (60 if row.cases == 0 or proc is None else 0)):
            proc.kill()
            proc.join()
            proc = None
            outcome, detail, before, after = "hang", f"no answer within {timeout} s", 0.0, 0.0
        else:
            try:
                outcome, detail, before, after = conn.recv()
            except EOFError:
                proc.join()
                outcome, detail, before, after = "other", f"the worker died (exit {proc.exitcode})", 0.0, 0.0
                proc = None
        if outcome in ("success", "clear") and after - before > max_rss_growth_mib:
            outcome, detail = "memory", f"peak RSS grew {after - before:.0f} MiB in this case"
        row.cases += 1
        setattr(row, outcome, getattr(row, outcome) + 1)
        row.peak_rss_mib = max(row.peak_rss_mib, after)
        if outcome not in ("success", "clear"):
            row.failures.append((i, outcome, detail))
            if save is not None:
                save.mkdir(parents=True, exist_ok=True)
                data, _ = case(name, make_seeds_cached(seeds_root)[name], seed, i)
                (save / f"{name}-{i}.bin").write_bytes(data)
                (save / f"{name}-{i}.txt").write_text(f"{outcome}\n{detail}\n")
    if proc is not None:
        conn.send(None)
        proc.join(10)
    row.seconds = round(time.time() - t0, 1)
    return row


def table(rows: list[Row]) -> str:
    head = ("target", "cases", "successes", "clear errors", "other exceptions", "hangs", "memory", "peak RSS MiB", "s")
    lines = [head] + [(r.target, r.cases, r.success, r.clear, r.other, r.hang, r.memory, f"{r.peak_rss_mib:.0f}",
                       f"{r.seconds:.0f}") for r in rows]
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(head))]
    out = ["| " + " | ".join(str(v).ljust(w) for v, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10000, help="cases per target (default: 10000)")
    p.add_argument("--targets", help="comma-separated (default: all): " + ", ".join(targets()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first", type=int, default=0, help="index of the first case (to split a campaign in runs)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    p.add_argument("--max-rss-growth", type=float, default=512.0, help="MiB one case may add to the peak RSS")
    p.add_argument("--save-failures", type=Path, help="write each failing input and its traceback here")
    p.add_argument("--workdir", type=Path, help="where the seed files are made (default: a temporary directory)")
    args = p.parse_args(argv)
    names = args.targets.split(",") if args.targets else list(targets())
    unknown = [n for n in names if n not in targets()]
    if unknown:
        p.error(f"unknown targets {unknown}; choose from {', '.join(targets())}")
    with (contextlib.nullcontext(str(args.workdir)) if args.workdir else tempfile.TemporaryDirectory()) as root:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        make_seeds_cached(root)  # once, before the workers fork
        print(f"seed files made in {root}", file=sys.stderr)
        rows = [run_target(n, args.cases, root, args.seed, args.timeout, args.max_rss_growth, args.save_failures,
                           args.first) for n in names]
    print(table(rows))
    for r in rows:
        for i, outcome, detail in r.failures[:3]:
            print(f"\n{r.target} case {i}: {outcome}\n{detail}")
    print(json.dumps({"fuzz": [{k: v for k, v in dataclasses.asdict(r).items() if k != "failures"} for r in rows],
                      "seed": args.seed, "first": args.first}))
    return 0 if all(r.other == r.hang == r.memory == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
