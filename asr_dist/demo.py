"""`asr-dist demo`: the whole pipeline on a synthesised Danish corpus, no download.

  eSpeak NG Danish voices ──> three training corpora in three layouts and rates
    (Common Voice TSV at 22.05 kHz, NeMo manifest at 44.1 kHz stereo, audiofolder at 8 kHz)
    and an evaluation corpus of held-out sentences
  ──> asr-dist shards build (train, eval with the training vocab) ──> shards verify ──> shards info

Re-running reuses the corpora and the finished shard set unless ``rebuild`` is set.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# (layout, sample rate, channels): the mix a real user arrives with
DEMO_CORPORA = (("commonvoice", 22050, 1), ("nemo", 44100, 2), ("audiofolder", 8000, 1))


NUM_HELD_OUT = 20  # sentences never heard in training, for the evaluation set


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
    from .synth import danish_sentences

    sentences = danish_sentences()
    train_sentences, eval_sentences = sentences[:-NUM_HELD_OUT], sentences[-NUM_HELD_OUT:]
    per = max(1, num_utterances // len(DEMO_CORPORA))
    inputs = [_corpus(out / "corpus" / layout, rebuild, layout=layout, num=per, seed=n, sample_rate=rate,
                      channels=channels, sentences=train_sentences)
              for n, (layout, rate, channels) in enumerate(DEMO_CORPORA)]
    held_out = _corpus(out / "corpus" / "eval", rebuild, layout="commonvoice", num=max(10, num_utterances // 8),
                       seed=100, sample_rate=22050, channels=1, sentences=eval_sentences, prefix="eval")
    return inputs, held_out


def run_demo(output: str = "demo-output", num_utterances: int = 400, workers: int = 1, rebuild: bool = False) -> int:
    from .data.verify import info, verify
    from .data.writer import BuildOptions, build

    out = Path(output)
    inputs, held_out = synthesise_corpora(out, num_utterances, rebuild)
    shards = out / "shards" / "train"
    summary = build(BuildOptions(inputs=inputs, output=str(shards), workers=workers, shard_size=50, overwrite=rebuild))
    print(summary.render())
    eval_summary = build(BuildOptions(inputs=[held_out], output=str(out / "shards" / "eval"), workers=workers,
                                      shard_size=50, overwrite=rebuild, vocab=str(shards / "vocab.json"),
                                      max_reject_fraction=0.5))
    print(eval_summary.render())
    problems = verify(str(shards)) + verify(str(out / "shards" / "eval"))
    for p in problems:
        print(p)
    print(info(str(shards)))
    print(
        f"\nnext:\n  asr-dist shards info {shards}\n  asr-dist shards verify {shards}\n"
        f"  asr-dist shards build --input YOUR_CORPUS.tsv --output YOUR_SHARDS   # your own data"
    )
    return 1 if problems or summary.failed or eval_summary.failed else 0
