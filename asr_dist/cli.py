"""The `asr-dist` command: one entry point, subcommands per task.

  asr-dist shards build|verify|info|merge|upload    shard sets (asr_dist.data), local or at URLs
  asr-dist train                             fine-tune with DeepSpeed (asr_dist.engine)
  asr-dist export-onnx                       ONNX for CPU serving; transcribe --onnx runs it
  asr-dist average                           the mean of several checkpoints, as one model
  asr-dist augment-preview                   listen to what the augment section does
  asr-dist demo                              synthesised Danish corpus, end to end
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .errors import UserError
from .logging import setup_logging

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _part(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part takes I/N, e.g. 0/8 (got {value!r})") from None
    return i, n


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--input", "-i", action="append", required=True, metavar="PATH",
                   help="a corpus: Common Voice .tsv or release directory (cv-corpus-N/da), NeMo .json/.jsonl "
                        "manifest, audiofolder directory (metadata.csv/.jsonl), Hugging Face dataset repository "
                        "as downloaded (parquet), datasets cache or save_to_disk directory, or Kaldi data dir; repeatable")
    g.add_argument("--input-format", choices=("commonvoice", "nemo", "audiofolder", "hf-dataset", "hf-hub", "hf-cache", "kaldi"),
                   help="force the layout of every --input instead of detecting it")
    g.add_argument("--text-column", help="transcript column/field (default: sentence, text, transcription, … as found)")
    g.add_argument("--audio-column", help="audio column of a datasets input (default: audio)")
    g.add_argument("--subset", metavar="NAME", help="subset (config) of a Hugging Face dataset repository or cache "
                                                    "(default: the card's default)")
    g.add_argument("--split", metavar="NAME", help="split of a Hugging Face dataset or Common Voice release "
                                                   "(train, dev, test, …; default: the only one)")
    g.add_argument("--keep-fields", metavar="F1,F2", type=lambda v: [f for f in v.split(",") if f.strip()],
                   help="metadata carried into each sample's JSON, e.g. speaker,gender,age,dialect (default: "
                        "Common Voice speaker,age,gender,accents; NeMo its extra keys; audiofolder and Hugging Face "
                        "their columns; Kaldi speaker and spk2gender's gender)")
    g.add_argument("--allow-commands", action="store_true",
                   help="run the shell commands of Kaldi wav.scp entries ending in '|' (only for manifests you trust)")
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="shard set directory, or an object-store URL (s3://bucket/prefix/set: built in --stage-dir, "
                        "verified, then uploaded with index.json last; credentials from the environment)")
    g.add_argument("--stage-dir", metavar="DIR",
                   help="with --output s3://…: where the set is built before the upload (default: a directory under "
                        "$TMPDIR named after the URL; a stopped build resumes there; removed after the upload)")
    g.add_argument("--audio-format", choices=("flac", "wav"), default="flac", help="stored audio, 16 kHz mono 16-bit (default: flac)")
    g.add_argument("--shard-size", type=int, default=1000, help="utterances per shard; only the last may be short (default: 1000)")
    g.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default: 0)")
    g.add_argument("--sort-in-shard", action="store_true", help="sort utterances by duration inside each shard")
    g.add_argument("--overwrite", action="store_true", help="replace a different shard set already in --output")
    g = p.add_argument_group("text")
    g.add_argument("--normalizer", choices=("danish", "basic", "none"), default="danish",
                   help="danish: NFKC, lower case, Danish letters, no punctuation (default); basic: NFKC, lower "
                        "case, no punctuation; none: whitespace only")
    g.add_argument("--hesitations", choices=("words", "drop"), help="danish: NPSC <ee> <mm> <qq> as words eee mmm qqq (default) or dropped")
    g.add_argument("--inaudible", choices=("drop", "keep"), help="danish: reject utterances with <inaudible> (default) or keep them without the tag")
    g.add_argument("--digits", choices=("spell", "keep", "reject"), help="danish: spell numbers out in Danish (default), keep digits, or reject")
    g.add_argument("--no-fold-accents", action="store_true", help="danish: reject é, ü, … instead of folding them to e, u, …")
    g.add_argument("--vocab", metavar="FILE", help="use this vocab.json; transcripts with other characters are rejected")
    g = p.add_argument_group("filters")
    g.add_argument("--min-duration", type=float, default=0.5, help="seconds (default: 0.5)")
    g.add_argument("--max-duration", type=float, default=30.0, help="seconds (default: 30)")
    g.add_argument("--max-reject-fraction", type=float, default=0.05,
                   help="exit 1 when more than this fraction of items is rejected (default: 0.05)")
    g = p.add_argument_group("running")
    g.add_argument("--workers", "-j", type=int, default=_default_workers(), help="processes (default: CPUs available)")
    g.add_argument("--part", type=_part, metavar="I/N", help="build only part I of N (0-based) for `shards merge`; see slurm/build-shards.sbatch")
    g.add_argument("--dry-run", action="store_true", help="scan inputs and read audio headers; write nothing")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_options_from_args(args):
    from .data.writer import BuildOptions

    settings = {k: getattr(args, k) for k in ("hesitations", "inaudible", "digits") if getattr(args, k) is not None}
    if args.no_fold_accents:
        settings["fold_accents"] = False
    if settings and args.normalizer != "danish":
        raise UserError(f"--{', --'.join(settings).replace('_', '-')} only apply to --normalizer danish")
    return BuildOptions(
        inputs=args.input, output=args.output, input_format=args.input_format, text_column=args.text_column,
        audio_column=args.audio_column, subset=args.subset, split=args.split, keep_fields=args.keep_fields,
        audio_format=args.audio_format, normalizer=args.normalizer,
        normalizer_settings=settings, vocab=args.vocab, min_duration=args.min_duration,
        max_duration=args.max_duration, shard_size=args.shard_size, seed=args.seed,
        sort_in_shard=args.sort_in_shard, workers=args.workers, part=args.part,
        max_reject_fraction=args.max_reject_fraction, allow_commands=args.allow_commands,
        overwrite=args.overwrite, dry_run=args.dry_run,
        progress=not args.no_progress,
    )


def cmd_shards_build(args) -> int:
    from .data.remote import is_url
    from .data.writer import build, build_to_url

    opts = build_options_from_args(args)
    if args.stage_dir and not is_url(opts.output):
        raise UserError("--stage-dir is for an --output at a URL (s3://…); a local --output is built in place")
    summary = build_to_url(opts, args.stage_dir) if is_url(opts.output) else build(opts)
    print(summary.render())
    return EXIT_FAILED if summary.failed else EXIT_OK


def cmd_shards_merge(args) -> int:
    from .data.remote import is_url
    from .data.writer import merge

    if is_url(args.output):
        raise UserError(f"--output {args.output}: shards merge writes a local directory; merge there, then "
                        f"`asr-dist shards upload DIR {args.output}`")
    summary = merge(args.parts, args.output, overwrite=args.overwrite, progress=not args.no_progress,
                    workers=args.workers, max_reject_fraction=args.max_reject_fraction)
    print(summary.render())
    return EXIT_FAILED if summary.failed else EXIT_OK


def cmd_shards_upload(args) -> int:
    from .data.remote import is_url
    from .data.writer import publish

    if not is_url(args.url):
        raise UserError(f"{args.url}: not a URL; shards upload copies a set to an object store (s3://bucket/prefix/set)")
    if publish(args.dir, args.url, overwrite=args.overwrite, progress=not args.no_progress):
        print(f"{args.url}: uploaded, verified first, index.json last")
    else:
        print(f"{args.url}: already holds this shard set; nothing uploaded")
    return EXIT_OK


def cmd_shards_verify(args) -> int:
    from .data.verify import verify

    problems = verify(args.dir, progress=not args.no_progress)
    for p in problems:
        print(p)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.dir}: every sample decodes and matches index.json and vocab.json")
    return EXIT_OK


def cmd_shards_info(args) -> int:
    from .data.index import read_index
    from .data.verify import info

    print(info(args.dir))
    if args.plot:
        from .plots import plot_durations

        plot_durations(read_index(args.dir), args.plot)
        print(f"duration histogram drawn in {args.plot}")
    return EXIT_OK


def cmd_report(args) -> int:
    from .plots import plot_run

    print(f"training curves drawn in {plot_run(args.run_dir, args.output)}")
    return EXIT_OK


def cmd_train(args) -> int:
    from .config import to_yaml
    from .distributed import configure_accelerator, get_env
    from .plan import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return EXIT_OK
    accelerator = configure_accelerator()
    if args.dry_run:
        from .plan import plan_run

        print(plan_run(cfg, args.world_size or get_env().world_size, cuda=accelerator == "cuda").describe())
        return EXIT_OK
    from .engine import TrainingError, train

    try:
        train(cfg)
    except TrainingError as e:
        print(f"asr-dist: training stopped: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_evaluate(args) -> int:
    import json

    from .decode import evaluate_model

    r = evaluate_model(args.model, args.shards, report=args.report, predictions=args.predictions,
                       micro_batch_size=args.batch_size, micro_batch_seconds=args.batch_seconds,
                       num_workers=args.workers, progress=not args.no_progress, decoder=_decoder_options(args),
                       group_by=args.by, seed=args.seed, subset=args.subset, split=args.split,
                       cache_dir=args.cache_dir)
    if r["world_size"] == 1 or get_rank_zero():
        print(json.dumps({k: r[k] for k in ("wer", "cer", "num_utterances", "num_words", "substitutions", "deletions",
                                            "insertions", "audio_hours", "real_time_factor")}, indent=1))
        for field, groups in (r.get("groups") or {}).items():
            print(f"\nby {field}:")
            print(f"  {'value':<24} {'utts':>6} {'words':>7} {'edits':>6} {'WER %':>7} {'95 % CI':>15} {'CER %':>7}")
            for value, g in groups.items():
                lo, hi = g["wer_ci95"]
                print(f"  {value[:24]:<24} {g['utterances']:>6} {g['ref_words']:>7} {g['word_edits']:>6} "
                      f"{100 * g['wer']:>7.2f} {f'{100 * lo:.1f}-{100 * hi:.1f}':>15} {100 * g['cer']:>7.2f}")
    return EXIT_OK


def _decoder_options(args) -> dict | None:
    """Greedy decoding unless --lm, --beam-width or an LM carried by the model asks for the beam search."""
    if args.no_lm:
        return {"greedy": True}
    if args.lm is None and not args.beam_width:
        return None
    return {"lm": args.lm, "beam_width": args.beam_width or 32, "alpha": args.lm_alpha, "beta": args.lm_beta}


def add_decoder_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (greedy unless --lm or --beam-width is given)")
    g.add_argument("--lm", metavar="FILE", help="n-gram language model, ARPA or KenLM binary (asr-dist lm build, or "
                                                "KenLM's lmplz), fused into a CTC beam search")
    g.add_argument("--beam-width", type=int, help="beams kept per frame (default with --lm: 32)")
    g.add_argument("--lm-alpha", type=float, default=0.5, help="weight of the LM log-probability (default: 0.5)")
    g.add_argument("--lm-beta", type=float, default=1.0, help="bonus per word, against short outputs (default: 1.0)")
    g.add_argument("--no-lm", action="store_true", help="greedy decoding even when the model carries a language model")


def cmd_lm_build(args) -> int:
    from .lm import build_arpa, shard_transcripts

    def sentences():
        for d in args.shards or []:
            yield from shard_transcripts(d)
        for f in args.text or []:
            with open(f, encoding="utf-8") as fh:
                yield from (line.strip() for line in fh)

    if not (args.shards or args.text):
        raise UserError("give --shards DIR... or --text FILE... to build the language model from")
    for f in args.text or []:
        if not os.path.isfile(f):
            raise UserError(f"--text {f}: no such file")
    info = build_arpa(sentences(), args.output, order=args.order)
    print(f"{args.output}: {info['sentences']} sentences, order {info['order']}, "
          + ", ".join(f"{info[f'{k}-grams']} {k}-grams" for k in range(1, info["order"] + 1)))
    if args.attach:
        from .lm import attach

        print(f"stored in {attach(args.attach, args.output, args.lm_alpha, args.lm_beta)}: "
              f"evaluate and transcribe with --model {args.attach} now use it (--no-lm: greedy)")
    return EXIT_OK


def get_rank_zero() -> bool:
    from .distributed import get_env

    return get_env().is_main


def cmd_transcribe(args) -> int:
    import json

    from .decode import transcribe

    failed = 0
    onnx = ("int8" if args.int8 else "fp32") if args.onnx else None
    if args.int8 and not args.onnx:
        raise UserError("transcribe --int8 runs the int8 ONNX model: give --onnx too")
    for r in transcribe(args.model, args.audio, chunk_length_s=args.chunk_length, stride_length_s=args.stride,
                        batch_size=args.batch_size, decoder=_decoder_options(args), onnx=onnx):
        failed += "error" in r
        print(json.dumps(r, ensure_ascii=False) if args.json else f"{r['audio']}\t{r.get('text', 'ERROR ' + r.get('error', ''))}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_export_onnx(args) -> int:
    from .onnx_export import export_onnx

    record = export_onnx(args.model, args.output, int8=args.int8, opset=args.opset)
    for name, check in record["files"].items():
        print(f"{args.output}/{name}: logits within {check['max_logit_difference']:.2g} of PyTorch's, "
              f"{100 * check['greedy_frame_agreement']:.1f} % of frames decoded alike (a padded check batch)")
    return EXIT_OK


def family_names() -> list[str]:
    """The model families (asr_dist.models.FAMILIES) read from the source of asr_dist/models/ (each registered
    class's ``name``), so that --help neither imports transformers nor keeps a list of its own."""
    import importlib.util
    import re
    from pathlib import Path

    models = Path(importlib.util.find_spec("asr_dist.models").origin).parent
    names = []
    for path in sorted(models.glob("*.py")):
        for block in path.read_text(encoding="utf-8").split("@register")[1:]:
            m = re.search(r'^\s+name = "([\w-]+)"', block, re.M)
            if m:
                names.append(m.group(1))
    return names


def cmd_average(args) -> int:
    from pathlib import Path

    from .average import average, best_checkpoints, last_checkpoints

    chosen = [args.checkpoints is not None, args.last is not None, args.best is not None]
    if sum(chosen) != 1:
        raise UserError("average: give one of --checkpoints DIR …, --last N or --best N (the last two with --run DIR)")
    if (args.last is not None or args.best is not None) and not args.run:
        raise UserError("average --last/--best: give the training output_dir as --run DIR")
    if args.checkpoints is not None:
        paths, what = [Path(p) for p in args.checkpoints], "as given"
        if len(paths) < 2:
            raise UserError("average --checkpoints: give two or more checkpoint directories")
    elif args.last is not None:
        paths, what = last_checkpoints(args.run, _at_least_two(args.last, "--last"))
    else:
        paths, what = best_checkpoints(args.run, _at_least_two(args.best, "--best"), args.set, args.metric)
    out = average(paths, args.output, what)
    print(f"averaged {len(paths)} checkpoints ({what}): {', '.join(p.name for p in paths)} -> {out}")
    return EXIT_OK


def _at_least_two(n: int, flag: str) -> int:
    if n < 2:
        raise UserError(f"average {flag} {n}: give 2 or more checkpoints to average")
    return n


def cmd_augment_preview(args) -> int:
    from .data.augment import Augmentation, write_preview
    from .plan import load_run_config
    from .config import shard_dirs

    cfg = load_run_config(args.config, args.overrides)
    augmentation = Augmentation.from_config(cfg.augment, cfg.seed)
    if augmentation is None:
        raise UserError(f"{args.config}: its augment section changes nothing (every augment.*_prob is 0); set e.g. "
                        f"augment.speed_prob=0.5 or augment.noise_prob=0.5 with augment.noise_dir=DIR")
    rows = write_preview(shard_dirs(cfg.data.train_shards), augmentation, args.out, count=args.count,
                         epoch=args.epoch, every_kind=args.every_kind)
    print(f"augmentation: {augmentation.describe()}")
    for r in rows:
        print(f"  {r['key']:<24} {r['seconds']:6.2f} s -> {r['augmented_seconds']:6.2f} s  "
              f"{', '.join(f'{k}={v}' for k, v in r['applied'].items()) or 'unchanged'}")
    print(f"{len(rows)} utterances in {args.out} (KEY.original.wav beside KEY.augmented.wav; applied.tsv)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.steps is not None and args.steps < 1:
        raise UserError(f"demo --steps {args.steps}: give a step count of 1 or more, or leave it out "
                         "to train for what fits in --minutes")
    return run_demo(output=args.output, num_utterances=args.num_utterances, workers=args.workers, rebuild=args.rebuild,
                    minutes=args.minutes, device=args.device, model=args.model, steps=args.steps)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr-dist", description="Fine-tune wav2vec2 / XLS-R CTC speech recognisers at scale.")
    parser.add_argument("--version", action="version", version=f"asr-dist {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shards = sub.add_parser("shards", help="build, check and describe WebDataset shard sets")
    ssub = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    p = ssub.add_parser("build", help="corpora in, 16 kHz WebDataset shards + index + vocab + rejects out",
                        description="Build a shard set from one or more corpora. Every rejected item is listed in "
                                    "rejects.tsv with its reason. Re-running an interrupted build with the same "
                                    "arguments keeps the finished shards and does the rest.")
    add_build_arguments(p)
    p.set_defaults(func=cmd_shards_build)
    p = ssub.add_parser("merge", help="join the parts of a --part I/N build into one shard set",
                        description="Join the shard sets of `shards build --part 0/N` … `--part N-1/N` into one set, "
                                    "byte-identical to a single build with the same arguments. Samples are copied, "
                                    "not decoded again.")
    p.add_argument("parts", nargs="+", metavar="PART_DIR", help="every part's output directory")
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a different shard set already in --output")
    p.add_argument("--workers", "-j", type=int, default=_default_workers(), help="processes (default: CPUs available)")
    p.add_argument("--max-reject-fraction", type=float, default=0.05,
                   help="exit 1 when more than this fraction of all parts' items was rejected (default: 0.05)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_shards_merge)
    p = ssub.add_parser("verify", help="decode every sample and check it against index.json; exit 1 on any damage")
    p.add_argument("dir", metavar="DIR", help="the shard set: a directory, or a URL (https://…, s3://…, pipe:COMMAND "
                                              "with {name})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_shards_verify)
    p = ssub.add_parser("upload", help="verify a local shard set and copy it to an object store, index.json last",
                        description="Verify the shard set in DIR, then upload every file to URL (s3://bucket/prefix/"
                                    "set; credentials from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                    "AWS_ENDPOINT_URL), index.json last so that no reader finds a partial set complete.")
    p.add_argument("dir", metavar="DIR", help="a finished shard set (shards build or shards merge)")
    p.add_argument("url", metavar="URL", help="where it goes: s3://bucket/prefix/set")
    p.add_argument("--overwrite", action="store_true", help="replace another shard set already at URL")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_shards_upload)
    p = ssub.add_parser("info", help="counts, hours, duration histogram and characters of a shard set")
    p.add_argument("dir", metavar="DIR", help="the shard set: a directory or a URL")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the duration histogram into this PNG")
    p.set_defaults(func=cmd_shards_info)

    p = sub.add_parser("train", help="fine-tune a CTC encoder (any model family) with DeepSpeed (one process here; see launch/train.py)",
                       description="Train from an experiment YAML. Overrides are dotted keys: train.max_steps=100 "
                                   "optim.lr=3e-4. Under deepspeed, torchrun or srun, every rank runs this.")
    p.add_argument("--config", "-c", required=True, metavar="YAML", help="experiment config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the DeepSpeed JSON, steps and hours; touch no GPU and build no model")
    p.add_argument("--world-size", type=int, help="with --dry-run: the number of ranks to plan for")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="exact WER/CER of a trained model on a shard set or any corpus",
                       description="Evaluate a model directory exported by training. SHARDS is a shard set, or a "
                                   "corpus in any layout `shards build` reads (normalised with the model's normaliser). "
                                   "Runs on one process, or on many under torchrun: the result is the same.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="{output_dir}/model or {output_dir}/best, or a training checkpoint {output_dir}/checkpoints/step-N")
    p.add_argument("--shards", required=True, metavar="DIR_OR_CORPUS",
                   help="a shard set (a directory, or a URL: https://…, s3://…, pipe:COMMAND with {name}), or a corpus")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="with --shards at a URL: fetch its shards once into this node-local directory, checksummed "
                        "(default: ranged reads, or a temporary copy where the server gives no ranges)")
    p.add_argument("--report", metavar="FILE.json", help="write wer, cer, counts, hours and real-time factor here")
    p.add_argument("--predictions", metavar="FILE.tsv", help="write key, reference, hypothesis, word errors per utterance")
    p.add_argument("--by", action="append", metavar="FIELD",
                   help="also report WER/CER per value of this metadata field of the samples (gender, dialect, …; "
                        "see shards info), with 95 %% bootstrap intervals; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling for --by (default: 0)")
    p.add_argument("--subset", metavar="NAME", help="where --shards is a Hugging Face dataset repository or cache: "
                                                    "its subset (default: the card's default)")
    p.add_argument("--split", metavar="NAME", help="where --shards is a Hugging Face dataset or a Common Voice "
                                                   "release: the split to evaluate (test, validation, …; default: the "
                                                   "only one)")
    p.add_argument("--batch-size", type=int, default=16, help="utterances per forward pass (default: 16)")
    p.add_argument("--batch-seconds", type=float, default=None, metavar="S",
                   help="instead: forward passes of as many utterances as fit in S seconds of audio, padding "
                        "included (sorted by length: many short ones or a few long ones; size it to the GPU)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default: 2)")
    p.add_argument("--no-progress", action="store_true")
    add_decoder_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("transcribe", help="transcribe audio files with a trained model")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="files in any format and sample rate")
    p.add_argument("--json", action="store_true", help="JSON lines instead of path<TAB>text")
    p.add_argument("--chunk-length", type=float, default=20.0, help="seconds per chunk for long audio (default: 20)")
    p.add_argument("--stride", type=float, default=4.0, help="seconds of overlap on each side of a chunk (default: 4)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass (default: 8)")
    p.add_argument("--onnx", action="store_true",
                   help="--model is a directory of `asr-dist export-onnx`: run its model.onnx through onnxruntime")
    p.add_argument("--int8", action="store_true", help="with --onnx: the int8 model (model.int8.onnx)")
    add_decoder_arguments(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("export-onnx", help="export a trained model to ONNX for CPU serving (onnxruntime, sherpa-onnx)",
                       description="Export a model directory ({output_dir}/model, best, or averaged) as model.onnx "
                                   "with dynamic batch and length, checked against the PyTorch model before it is "
                                   "kept, beside the processor, vocab and language model: `asr-dist transcribe "
                                   "--onnx` reads the result. wav2vec2 (XLS-R, MMS), HuBERT and data2vec-audio.")
    p.add_argument("--model", required=True, metavar="DIR", help="an exported model directory")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the ONNX directory (replaced)")
    p.add_argument("--int8", action="store_true",
                   help="also model.int8.onnx: int8 weights by onnxruntime's dynamic quantisation (smaller, faster)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.set_defaults(func=cmd_export_onnx)

    lm = sub.add_parser("lm", help="n-gram language models for decoding")
    lsub = lm.add_subparsers(dest="lm_command", required=True, metavar="SUBCOMMAND")
    p = lsub.add_parser("build", help="estimate a Kneser-Ney n-gram model (ARPA) from shard transcripts or text files",
                        description="Interpolated Kneser-Ney, for transcripts of modest size (a few million words). "
                                    "Text files must be normalised the way the model's training data was (one "
                                    "sentence a line); shard sets already are. For large corpora use KenLM's lmplz.")
    p.add_argument("--shards", nargs="+", metavar="DIR", help="shard sets whose transcripts to use")
    p.add_argument("--text", nargs="+", metavar="FILE", help="normalised text, one sentence a line")
    p.add_argument("--output", "-o", required=True, metavar="FILE.arpa")
    p.add_argument("--order", type=int, default=3, help="n-gram order (default: 3)")
    p.add_argument("--attach", metavar="MODEL_DIR", help="also store it in this exported model directory, as "
                                                          "Wav2Vec2ProcessorWithLM expects, to decode with by default")
    p.add_argument("--lm-alpha", type=float, default=0.5, help="with --attach: the LM weight stored (default: 0.5)")
    p.add_argument("--lm-beta", type=float, default=1.0, help="with --attach: the word bonus stored (default: 1.0)")
    p.set_defaults(func=cmd_lm_build)

    p = sub.add_parser("report", help="draw a run's loss, learning rate and WER curves (per set, pooled, per group) "
                                         "into a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training output_dir (reads its metrics.jsonl)")
    p.add_argument("--output", "-o", metavar="FILE.png", help="default: RUN_DIR/report.png")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("average", help="average the weights of several training checkpoints into one model",
                       description="The element-wise mean of the weights of DeepSpeed checkpoints (any ZeRO stage, "
                                   "read safely), written as a model directory like a training export: `evaluate`, "
                                   "`transcribe` and transformers' pipeline() load it. Averaging the last or best few "
                                   "checkpoints usually lowers the WER at no training cost.")
    p.add_argument("--checkpoints", nargs="+", metavar="DIR", help="checkpoint directories ({output_dir}/checkpoints/step-N)")
    p.add_argument("--run", metavar="OUTPUT_DIR", help="with --last or --best: the training output_dir")
    p.add_argument("--last", type=int, metavar="N", help="the run's last N complete checkpoints")
    p.add_argument("--best", type=int, metavar="N",
                   help="the run's N checkpoints with the lowest evaluation metric (of those saved at an evaluation)")
    p.add_argument("--set", metavar="NAME", help="with --best: the evaluation set to rank by (default: the run's)")
    p.add_argument("--metric", choices=("wer", "cer", "loss"), help="with --best: the metric to rank by (default: the run's)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the averaged model directory (replaced)")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("augment-preview", help="write a few training utterances beside their augmented selves, to listen",
                       description="Apply a training config's augment section to the first training utterances, as "
                                   "the loader would in --epoch, and write KEY.original.wav and KEY.augmented.wav "
                                   "for each, with applied.tsv saying what was applied.")
    p.add_argument("--config", "-c", required=True, metavar="YAML", help="the training config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. augment.noise_prob=1")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="where the WAV files go")
    p.add_argument("--count", "-n", type=int, default=8, help="utterances (default: 8)")
    p.add_argument("--epoch", type=int, default=0, help="the epoch whose draws to apply (default: 0)")
    p.add_argument("--every-kind", action="store_true",
                   help="apply every configured kind to every utterance (as if each probability were 1)")
    p.set_defaults(func=cmd_augment_preview)

    p = sub.add_parser("demo", help="synthesise Danish speech, build shards, train and evaluate a small model; no download",
                       description="The whole pipeline on a laptop: eSpeak NG Danish voices -> shards -> DeepSpeed "
                                   "training of a tiny wav2vec2 from scratch -> exact WER/CER before and after.")
    p.add_argument("--output", "-o", default="demo-output", metavar="DIR", help="where everything goes (default: ./demo-output)")
    p.add_argument("--num-utterances", type=int, default=4000, help="synthetic training utterances (default: 4000)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget: as many steps as fit, and never fewer than the model needs to learn (the "
                        "demo then says how long those take); more minutes, a better model (default: 10)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="train exactly N steps instead of what fits in --minutes: the same model on any machine")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: a GPU when there is one")
    p.add_argument("--model", default="wav2vec2", metavar="FAMILY",
                   help=f"the encoder family whose tiny preset trains: {', '.join(family_names())} (default: wav2vec2)")
    p.add_argument("--workers", "-j", type=int, default=_default_workers())
    p.add_argument("--rebuild", action="store_true", help="synthesise and build again instead of reusing earlier output")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except UserError as e:  # the project's own errors, which say what to change; anything else is a bug
        if args.verbose:
            raise
        print(f"asr-dist: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asr-dist: interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130


def run(argv: list[str] | None = None) -> None:
    """The `asr-dist` command (and launch/*.py): main(), then the exit handlers, then the end of the process
    without the interpreter's finalization.

    A distributed run's gloo worker threads may still be releasing the tensors of its last collective when the
    main thread ends: DeepSpeed keeps its process groups, and so those threads, alive past destroy_process_group.
    A worker that needs the GIL for that after finalization has begun aborts the process ("terminate called
    without an active exception", SIGABRT) after a run that had finished well, and the launcher reports the job
    failed. Everything a normal exit does for Python code still happens first: the atexit handlers (logging,
    temporary directories, loader worker processes) and the flush of stdout and stderr. An error that escapes
    main() ends the process the usual way, with its traceback."""
    import atexit

    code = main(argv)
    atexit._run_exitfuncs()  # what the interpreter's exit runs: no public call gives them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)  # as sys.exit reads it


if __name__ == "__main__":
    run()
