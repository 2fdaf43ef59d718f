"""`asr-dist demo`: the whole pipeline on a synthesised Danish corpus, no download.

  eSpeak NG Danish voices ──> three training corpora in three layouts and rates
    (Common Voice TSV at 22.05 kHz, NeMo manifest at 44.1 kHz stereo, audiofolder at 8 kHz)
    and an evaluation corpus of held-out sentences
  ──> asr-dist shards build (train, eval with the training vocab) ──> shards verify
  ──> untrained model evaluated ──> a tiny model (wav2vec2, or --model FAMILY's tiny preset) trained
      with the real engine (DeepSpeed) for as many steps as fit --minutes on this machine, and never fewer
      than it needs to learn (MIN_STEPS)
  ──> exported, evaluated, WER/CER printed

Re-running reuses the corpora and the finished shard set unless ``rebuild`` is set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# (layout, sample rate, channels): the mix a real user arrives with
DEMO_CORPORA = (("commonvoice", 22050, 1), ("nemo", 44100, 2), ("audiofolder", 8000, 1))


NUM_HELD_OUT = 20  # sentences never heard in training, for the evaluation set
# the fewest steps after which the default demo prints a trained CER at or under 0.15 (bench/README.md): a
# machine too slow for them in --minutes trains them anyway, saying how long it will take
MIN_STEPS = 2000


def _corpus(d: Path, rebuild: bool, **spec) -> str:
    from .synth import write_corpus

    done = d / ".complete"
    if rebuild and d.exists():
        shutil.rmtree(d)
    if not done.exists():
        log.info("synthesising %d utterances as %s at %d Hz, %d channel(s)", spec["num"], spec["layout"],
                 spec["sample_rate"], spec["channels"])
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(write_corpus(d, **spec))
    return done.read_text().strip()


def synthesise_corpora(out: Path, num_utterances: int, rebuild: bool) -> tuple[list[str], str]:
    """(training inputs in three layouts, an evaluation input of held-out sentences)."""
    from .synth import danish_sentences, recombine

    sentences = danish_sentences()
    train_sentences, eval_sentences = sentences[:-NUM_HELD_OUT], sentences[-NUM_HELD_OUT:]
    train_sentences = train_sentences + recombine(train_sentences, 4 * len(train_sentences))
    per = max(1, num_utterances // len(DEMO_CORPORA))
    inputs = [_corpus(out / "corpus" / layout, rebuild, layout=layout, num=per, seed=n, sample_rate=rate,
                      channels=channels, sentences=train_sentences)
              for n, (layout, rate, channels) in enumerate(DEMO_CORPORA)]
    held_out = _corpus(out / "corpus" / "eval", rebuild, layout="commonvoice", num=max(10, min(250, num_utterances // 8)),
                       seed=100, sample_rate=22050, channels=1, sentences=eval_sentences, prefix="eval")
    return inputs, held_out


def step_seconds(cfg, vocab: dict, device: torch.device, audio_seconds: float) -> float:
    """Seconds one optimizer step of the demo's model takes on this machine: the fastest of five timed
    steps after a warm-up one (a moment of other work on the cores, as a test suite ending, doubled a
    two-step estimate and halved the demo's training)."""
    import numpy as np

    from .models import build_model

    model, family = build_model(cfg.model, vocab)
    model = model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n = cfg.data.global_batch_size
    # the family's input for an utterance of that length (a waveform, or fbank frames), the same for each
    one = family.featurizer()(np.random.default_rng(0).standard_normal(int(audio_seconds * 16000)).astype(np.float32))
    x = torch.from_numpy(one).to(device).expand(n, *one.shape).contiguous()
    labels = torch.randint(3, len(vocab), (n, int(audio_seconds * 12)), device=device)
    times = []
    for _ in range(6):
        t = time.time()
        model(**{family.input_name: x}, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t)
    return min(times[1:])


def run_demo(output: str = "demo-output", num_utterances: int = 4000, workers: int = 1, rebuild: bool = False,
             minutes: float = 10.0, device: str = "auto", model: str = "wav2vec2", steps: int | None = None) -> int:
    from importlib import resources

    from .config import load_config
    from .data.shardset import ShardSet
    from .data.verify import verify
    from .data.writer import BuildOptions, build
    from .decode import evaluate_model
    from .distributed import configure_accelerator
    from .engine import train
    from .export import make_processor
    from .models import FAMILIES, build_model

    if model not in FAMILIES:
        from .models import ModelError

        raise ModelError(f"--model {model}: choose one of {', '.join(FAMILIES)} (each trains its tiny preset)")
    t_start = time.time()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    configure_accelerator()
    out = Path(output)
    print(f"[1/5] synthesising Danish speech in {out / 'corpus'} (eSpeak NG; reused when present)", flush=True)
    inputs, held_out = synthesise_corpora(out, num_utterances, rebuild)
    print("[2/5] building and verifying shards", flush=True)
    shards = out / "shards" / "train"
    summary = build(BuildOptions(inputs=inputs, output=str(shards), workers=workers, shard_size=100, overwrite=rebuild))
    print(summary.render())
    eval_summary = build(BuildOptions(inputs=[held_out], output=str(out / "shards" / "eval"), workers=workers,
                                      shard_size=100, overwrite=rebuild, vocab=str(shards / "vocab.json"),
                                      max_reject_fraction=0.5))
    print(eval_summary.render())
    problems = verify(str(shards), progress=False) + verify(str(out / "shards" / "eval"), progress=False)
    if problems or summary.failed or eval_summary.failed:
        print("\n".join(problems))
        return 1

    run = out / "run"
    with resources.as_file(resources.files("asr_dist").joinpath("resources/demo.yaml")) as demo_yaml:
        cfg = load_config(str(demo_yaml), [f"output_dir={run}", f"data.train_shards=[{shards}]",
                                           f"data.eval_shards.dev={out / 'shards' / 'eval'}", f"model.family={model}"])
    if device == "cuda":
        cfg.distributed.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    vocab = ShardSet.open(str(shards)).vocab
    mean_seconds = summary.audio_seconds / max(1, summary.num_kept)
    per_step = step_seconds(cfg, vocab, torch.device(device), mean_seconds)
    if steps is None:
        budget = minutes * 60 - (time.time() - t_start) - 60  # start-up, evaluations and export
        # data loading shares the cores and each epoch restarts its workers: 1.4x the bare step time
        fit = int(min(20000, budget / (per_step * 1.4)))
        cfg.train.max_steps = max(MIN_STEPS, fit)
        if fit < MIN_STEPS:
            fits = (f"the {MIN_STEPS} steps the model needs to learn take about "
                    f"{MIN_STEPS * per_step * 1.4 / 60:.0f} minutes here, longer than --minutes {minutes:g}; "
                    f"the log shows the progress and an ETA")
        else:
            fits = f"{cfg.train.max_steps} steps fit in --minutes {minutes:g}"
    else:
        cfg.train.max_steps = steps
        fits = f"--steps {steps}: about {steps * per_step * 1.4 / 60:.1f} minutes of training"
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, cfg.train.max_steps // 3)
    print(f"[3/5] evaluating the untrained model ({per_step:.2f} s per step of {cfg.data.global_batch_size} "
          f"utterances here: {fits})", flush=True)
    untrained = out / "untrained"
    if untrained.exists():
        shutil.rmtree(untrained)
    untrained_model, family = build_model(cfg.model, vocab, seed=cfg.seed)
    untrained_model.save_pretrained(str(untrained))
    make_processor(shards / "vocab.json", family).save_pretrained(str(untrained))
    before = evaluate_model(str(untrained), str(out / "shards" / "eval"), progress=False, num_workers=0)

    print(f"[4/5] training the tiny {family.name} on {device} with DeepSpeed; TensorBoard logs in {run / 'tensorboard'}",
          flush=True)
    if run.exists():
        shutil.rmtree(run)
    train(cfg)
    print("[5/5] evaluating the trained model", flush=True)
    after = evaluate_model(str(run / "model"), str(out / "shards" / "eval"), progress=False, num_workers=0,
                           predictions=str(out / "predictions.tsv"), report=str(out / "report.json"))
    with_lm = _with_language_model(out, shards, run / "model")
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps({"untrained": {k: before[k] for k in ("wer", "cer")},
                                        "trained": {k: after[k] for k in ("wer", "cer")},
                                        "trained_with_lm": {k: with_lm[k] for k in ("wer", "cer")} if with_lm else None,
                                        "steps": cfg.train.max_steps, "minutes": (time.time() - t_start) / 60}, indent=1))
    lm_row = (f"\n  + 3-gram LM  {with_lm['wer']:6.3f}   {with_lm['cer']:6.3f}   (beam search; the LM is stored in the "
              f"model: --no-lm for greedy)") if with_lm else ""
    print(f"""
held-out Danish sentences ({after['num_utterances']} utterances, {after['num_words']} words):
                 WER      CER
  untrained   {before['wer']:6.3f}   {before['cer']:6.3f}
  trained     {after['wer']:6.3f}   {after['cer']:6.3f}{lm_row}

done in {(time.time() - t_start) / 60:.1f} minutes. Next:
  tensorboard --logdir {run / 'tensorboard'}
  asr-dist transcribe --model {run / 'model'} {held_out_audio(held_out)}
  asr-dist evaluate --model {run / 'model'} --shards {out / 'shards' / 'eval'} --predictions predictions.tsv
  asr-dist shards build --input YOUR_CORPUS.tsv --output YOUR_SHARDS      # your own data
  asr-dist train --config configs/xlsr300m-danish.yaml model.pretrained=/path/to/xls-r-300m …""")
    return 0


def _with_language_model(out: Path, shards: Path, model: Path) -> dict | None:
    """A 3-gram LM from the training transcripts (the held-out sentences are not in it), stored in the
    exported model, and the held-out WER/CER decoding with it; None where kenlm is not installed."""
    import importlib.util

    if importlib.util.find_spec("kenlm") is None:
        print("(no kenlm: pip install 'asr-dist[lm]' to add the n-gram language model step)")
        return None
    from .decode import evaluate_model
    from .lm import attach, build_arpa, shard_transcripts

    print("[+] building a 3-gram language model from the training transcripts and decoding with it", flush=True)
    build_arpa(shard_transcripts(shards), out / "lm.arpa", order=3)
    # a small LM from 1200 sentences, the held-out ones unseen: a light weight (alpha picked on a grid of demo runs)
    attach(model, out / "lm.arpa", alpha=0.3, beta=1.0)
    return evaluate_model(str(model), str(out / "shards" / "eval"), progress=False, num_workers=0)


def held_out_audio(tsv: str) -> str:
    first = Path(tsv).read_text(encoding="utf-8").splitlines()[1].split("\t")[1]
    return str(Path(tsv).parent / "clips" / first)
