"""`asr-dist demo`: the whole pipeline on a synthesised Danish corpus, no download.

  eSpeak NG Danish voices ──> three corpora in three layouts and rates
    (Common Voice TSV at 22.05 kHz, NeMo manifest at 44.1 kHz stereo, audiofolder at 8 kHz)
  ──> asr-dist shards build ──> shards verify ──> shards info

Re-running reuses the corpora and the finished shard set unless ``rebuild`` is set.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# (layout, sample rate, channels): the mix a real user arrives with
DEMO_CORPORA = (("commonvoice", 22050, 1), ("nemo", 44100, 2), ("audiofolder", 8000, 1))


def synthesise_corpora(out: Path, num_utterances: int, rebuild: bool) -> list[str]:
    from .synth import write_corpus

    inputs = []
    per = max(1, num_utterances // len(DEMO_CORPORA))
    for n, (layout, rate, channels) in enumerate(DEMO_CORPORA):
        d = out / "corpus" / layout
        done = d / ".complete"
        if rebuild and d.exists():
            shutil.rmtree(d)
        if done.exists():
            inputs.append(done.read_text().strip())
            continue
        log.info("synthesising %d utterances as %s at %d Hz, %d channel(s)", per, layout, rate, channels)
        path = write_corpus(d, layout, per, seed=n, sample_rate=rate, channels=channels)
        done.write_text(path)
        inputs.append(path)
    return inputs


def run_demo(output: str = "demo-output", num_utterances: int = 400, workers: int = 1, rebuild: bool = False) -> int:
    from .data.verify import info, verify
    from .data.writer import BuildOptions, build

    out = Path(output)
    inputs = synthesise_corpora(out, num_utterances, rebuild)
    shards = out / "shards"
    summary = build(BuildOptions(inputs=inputs, output=str(shards), workers=workers, shard_size=100, overwrite=rebuild))
    print(summary.render())
    problems = verify(str(shards))
    for p in problems:
        print(p)
    print(info(str(shards)))
    print(
        f"\nnext:\n  asr-dist shards info {shards}\n  asr-dist shards verify {shards}\n"
        f"  asr-dist shards build --input YOUR_CORPUS.tsv --output YOUR_SHARDS   # your own data"
    )
    return 1 if problems or summary.failed else 0
