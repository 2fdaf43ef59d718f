"""The demo's data half without training (tests/test_cli.py runs the whole demo, slow): three training
corpora in three layouts and rates, held-out sentences never heard in training, reused on a re-run."""

from __future__ import annotations

import csv
from pathlib import Path

import soundfile as sf

from asr_dist.demo import DEMO_CORPORA, held_out_audio, synthesise_corpora


def transcripts(tsv: str) -> set[str]:
    return {r["sentence"] for r in csv.DictReader(open(tsv, encoding="utf-8"), delimiter="\t")}


def test_demo_corpora_hold_out_their_evaluation_sentences_and_are_reused(tmp_path):
    inputs, held_out = synthesise_corpora(tmp_path, num_utterances=6, rebuild=False)
    assert [Path(p).relative_to(tmp_path).parts[1] for p in inputs] == [layout for layout, _, _ in DEMO_CORPORA]
    cv = next(p for p in inputs if p.endswith(".tsv"))
    rate = {layout: r for layout, r, _ in DEMO_CORPORA}["commonvoice"]
    assert sf.info(held_out_audio(cv)).samplerate == rate
    assert sf.info(held_out_audio(held_out)).samplerate == 22050
    evaluation = transcripts(held_out)
    assert len(evaluation) >= 5 and not evaluation & transcripts(cv)  # never heard in training
    stamp = Path(held_out).stat().st_mtime_ns
    assert synthesise_corpora(tmp_path, num_utterances=6, rebuild=False) == (inputs, held_out)
    assert Path(held_out).stat().st_mtime_ns == stamp  # reused, not synthesised again
