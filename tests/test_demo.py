"""The demo's data half without training (tests/test_cli.py runs the whole demo, slow): three training
corpora in three layouts and rates, held-out sentences never heard in training, reused on a re-run."""

from __future__ import annotations

import csv
import re
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


def test_demo_model_names_every_family_and_times_its_input(tmp_path, capsys):
    """`asr-dist demo --model FAMILY` trains that family's tiny preset: --help lists every family, the step
    timing feeds the family's own input (w2v-BERT's fbank frames, not a waveform), and a name that is no
    family is refused before anything is synthesised."""
    import pytest

    from asr_dist.cli import family_names, main
    from asr_dist.config import merge_config
    from asr_dist.demo import step_seconds
    from asr_dist.models import FAMILIES

    assert sorted(family_names()) == sorted(FAMILIES)
    from asr_dist.text import PAD_TOKEN, UNK_TOKEN, WORD_DELIMITER

    vocab = {PAD_TOKEN: 0, UNK_TOKEN: 1, WORD_DELIMITER: 2, **{c: i + 3 for i, c in enumerate("abcdefghij")}}
    cfg = merge_config(None, ["model.preset=tiny", "model.family=wav2vec2-bert", "data.global_batch_size=2",
                              f"output_dir={tmp_path / 'run'}", "data.train_shards=[x]"])
    assert step_seconds(cfg, vocab, __import__("torch").device("cpu"), audio_seconds=0.5) > 0
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # as argparse wrapped it
    assert all(name in text for name in FAMILIES), text
    assert main(["demo", "--output", str(tmp_path / "demo"), "--model", "whisper"]) == 2
    assert "choose one of wav2vec2, hubert" in capsys.readouterr().err and not (tmp_path / "demo").exists()
