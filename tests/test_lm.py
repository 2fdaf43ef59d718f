"""n-gram LM decoding: the ARPA builder's probabilities, the CTC beam search against hand-made logits,
and the LM changing a decision the acoustics leave open."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from asr_dist.cli import main
from asr_dist.lm import BeamSearchDecoder, LMError, LanguageModel, build_arpa
from asr_dist.metrics import GreedyDecoder

kenlm = pytest.importorskip("kenlm")
VOCAB = {"[PAD]": 0, "[UNK]": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abdehkmnstuø")}}


def frames(spec: list[dict[str, float]]) -> torch.Tensor:
    """One frame per dict of token -> probability (the rest shared by the others), as logits (1, F, V)."""
    rows = []
    for d in spec:
        p = np.full(len(VOCAB), 1e-4)
        for tok, q in d.items():
            p[VOCAB[tok]] = q
        rows.append(np.log(p / p.sum()))
    return torch.tensor(np.array(rows), dtype=torch.float32)[None]


def spell(text: str) -> list[dict[str, float]]:
    """Sure frames for a text: each character, a blank between letters, "|" between words."""
    out = []
    for ch in text:
        out += [{"|" if ch == " " else ch: 0.99}, {"[PAD]": 0.99}]
    return out


def test_arpa_probabilities_sum_to_one(tmp_path):
    sentences = ["hun bad hus", "hun bad mad", "et hus ved havet", "hun så et hus", "det er en kat", "en kat og en hund"]
    info = build_arpa(sentences * 3 + ["sjælden sætning her"], tmp_path / "lm.arpa", order=3)
    assert info["sentences"] == 19 and info["3-grams"] > 0
    m = kenlm.Model(str(tmp_path / "lm.arpa"))
    words = sorted({w for s in sentences for w in s.split()} | {"sjælden", "sætning", "her", "</s>", "<unk>"})
    for context in ([], ["hun"], ["hun", "bad"], ["et", "hus"], ["ukendt", "ord"]):
        state = kenlm.State()
        m.BeginSentenceWrite(state)
        for w in context:
            nxt = kenlm.State()
            m.BaseScore(state, w, nxt)
            state = nxt
        total = sum(10 ** m.BaseScore(state, w, kenlm.State()) for w in words)
        assert total == pytest.approx(1.0, abs=1e-4), context
    # the data's own continuations are the likely ones
    assert m.score("hun bad hus", bos=True, eos=True) > m.score("hus bad hun", bos=True, eos=True)


def test_beam_search_without_lm_matches_greedy_on_clear_frames():
    logits = frames(spell("hun bad et hus"))
    n = torch.tensor([logits.shape[1]])
    assert BeamSearchDecoder(VOCAB, beam_width=8)(logits, n) == GreedyDecoder(VOCAB)(logits, n) == ["hun bad et hus"]
    # repeats collapse unless a blank separates them; leading, trailing and double delimiters vanish
    logits = frames([{"|": 0.9}, {"m": 0.9}, {"m": 0.9}, {"[PAD]": 0.9}, {"m": 0.9}, {"|": 0.9}, {"|": 0.9}, {"a": 0.9}])
    assert BeamSearchDecoder(VOCAB, beam_width=8)(logits, torch.tensor([8])) == ["mm a"]


def test_lm_settles_what_the_acoustics_leave_open(tmp_path):
    build_arpa(["hun bad et hus"] * 20 + ["hun bad et bad", "et hus"], tmp_path / "lm.arpa", order=3)
    # the last word sounds a little more like "hum" than "hus"
    spec = spell("hun bad et hu") + [{"m": 0.55, "s": 0.44}, {"[PAD]": 0.99}]
    logits, n = frames(spec), torch.tensor([len(spec)])
    assert GreedyDecoder(VOCAB)(logits, n) == ["hun bad et hum"]
    assert BeamSearchDecoder(VOCAB, beam_width=16)(logits, n) == ["hun bad et hum"]
    lm = LanguageModel(tmp_path / "lm.arpa")
    assert BeamSearchDecoder(VOCAB, lm, beam_width=16, alpha=0.5, beta=1.0)(logits, n) == ["hun bad et hus"]
    assert BeamSearchDecoder(VOCAB, lm, beam_width=16, alpha=0.0, beta=0.0)(logits, n) == ["hun bad et hum"]


def test_bad_lm_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(LMError, match="no such language model"):
        LanguageModel(tmp_path / "missing.arpa")
    (tmp_path / "bad.arpa").write_text("not an arpa file\n")
    with pytest.raises(LMError, match="KenLM cannot read it"):
        LanguageModel(tmp_path / "bad.arpa")
    with pytest.raises(LMError, match="no text"):
        build_arpa(["", "  "], tmp_path / "empty.arpa")


def test_cli_builds_an_lm_from_shards_and_evaluates_with_it(tmp_path, capsys):
    from asr_dist.data.writer import BuildOptions, build
    from asr_dist.export import make_processor
    from asr_dist.models.presets import PRESETS
    from asr_dist.synth import write_corpus
    import transformers

    src = write_corpus(tmp_path / "corpus", "nemo", 6, seed=31)
    build(BuildOptions(inputs=[src], output=str(tmp_path / "shards"), shard_size=3, progress=False))
    assert main(["lm", "build", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "lm.arpa")]) == 0
    assert "6 sentences, order 3" in capsys.readouterr().out
    vocab = json.loads((tmp_path / "shards" / "vocab.json").read_text())
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**PRESETS["tiny"], vocab_size=len(vocab), pad_token_id=0))
    model.save_pretrained(str(tmp_path / "model"))
    make_processor(tmp_path / "shards" / "vocab.json").save_pretrained(str(tmp_path / "model"))
    report = tmp_path / "wer.json"
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--shards", str(tmp_path / "shards"), "--workers", "0",
                 "--no-progress", "--lm", str(tmp_path / "lm.arpa"), "--beam-width", "4", "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["decoder"] == {"decoder": "beam", "beam_width": 4, "lm": str(tmp_path / "lm.arpa"), "lm_alpha": 0.5,
                            "lm_beta": 1.0}
    assert r["num_utterances"] == 6 and not math.isnan(r["wer"])
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--shards", str(tmp_path / "shards"),
                 "--lm", str(tmp_path / "nope.arpa")]) == 2
    assert "no such language model" in capsys.readouterr().err


@pytest.mark.slow  # two minutes of speech through the model twice
def test_two_minute_recording_chunks_like_the_pipeline_and_decodes_with_an_lm(tmp_path, capsys):
    """A 2-minute file of concatenated utterances: our chunked logits, decoded greedily, give exactly the
    transformers pipeline's strided-CTC transcript; `transcribe --lm` decodes the same chunks."""
    import soundfile as sf
    import transformers

    from asr_dist.audio import decode, to_16k
    from asr_dist.decode import chunked_logits
    from asr_dist.export import make_processor
    from asr_dist.models.presets import PRESETS
    from asr_dist.synth import write_corpus

    manifest = write_corpus(tmp_path / "corpus", "nemo", 40, seed=41, sample_rate=16000)
    rows = [json.loads(line) for line in open(manifest, encoding="utf-8")]
    parts = [to_16k(*decode(str(tmp_path / "corpus" / r["audio_filepath"]))) for r in rows]
    audio = np.concatenate(parts * 3)[: 120 * 16000]
    assert len(audio) == 120 * 16000, len(audio) / 16000
    sf.write(tmp_path / "long.wav", audio, 16000)
    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyzæøå")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**PRESETS["tiny"], vocab_size=len(vocab),
                                                                    pad_token_id=0)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a random model with sharp, varied outputs
    model.save_pretrained(str(tmp_path / "model"))
    make_processor(tmp_path / "vocab.json").save_pretrained(str(tmp_path / "model"))
    asr = transformers.pipeline("automatic-speech-recognition", model=str(tmp_path / "model"), device="cpu")
    expected = asr({"raw": audio, "sampling_rate": 16000}, chunk_length_s=20, stride_length_s=4, batch_size=4)["text"]
    logits = chunked_logits(model, audio, 20 * 16000, 4 * 16000, 4, "cpu")
    assert abs(logits.shape[0] - 120 * 50) <= 1
    ours = GreedyDecoder(vocab)(logits[None], torch.tensor([logits.shape[0]]))[0]
    assert ours == " ".join(expected.replace("[UNK]", "").split()) and len(ours) > 1000
    build_arpa([r["text"] for r in rows], tmp_path / "lm.arpa", order=2)
    assert main(["transcribe", "--model", str(tmp_path / "model"), str(tmp_path / "long.wav"), "--json",
                 "--lm", str(tmp_path / "lm.arpa"), "--beam-width", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["duration"] == 120.0 and len(out["text"]) > 0


def test_attached_lm_is_used_by_default_and_readable_as_pyctcdecode_expects(tmp_path, capsys):
    import transformers

    from asr_dist.export import make_processor
    from asr_dist.lm import attached
    from asr_dist.models.presets import PRESETS

    (tmp_path / "text.txt").write_text("hun bad et hus\nhun bad et bad\n", encoding="utf-8")
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**PRESETS["tiny"], vocab_size=len(VOCAB),
                                                                    pad_token_id=0))
    model.save_pretrained(str(tmp_path / "model"))
    make_processor(tmp_path / "vocab.json").save_pretrained(str(tmp_path / "model"))
    assert main(["lm", "build", "--text", str(tmp_path / "text.txt"), "--output", str(tmp_path / "lm.arpa"),
                 "--attach", str(tmp_path / "model"), "--lm-alpha", "0.7"]) == 0
    carried = attached(tmp_path / "model")
    assert carried == {"lm": str(tmp_path / "model" / "language_model" / "lm.arpa"), "alpha": 0.7, "beta": 1.0}
    lmdir = tmp_path / "model" / "language_model"
    assert set((lmdir / "unigrams.txt").read_text().split()) == {"hun", "bad", "et", "hus"}
    labels = json.loads((tmp_path / "model" / "alphabet.json").read_text())["labels"]
    assert len(labels) == len(VOCAB) and labels[0] == "" and labels[2] == " "
    assert json.loads((tmp_path / "model" / "processor_config.json").read_text())["processor_class"] == \
        "Wav2Vec2ProcessorWithLM"
    # transformers' pipeline still loads the directory (without pyctcdecode it decodes greedily): its transcript
    # is the model's own greedy decode of the same audio
    asr = transformers.pipeline("automatic-speech-recognition", model=str(tmp_path / "model"), device="cpu")
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    features = transformers.AutoFeatureExtractor.from_pretrained(str(tmp_path / "model"))
    tokenizer = transformers.Wav2Vec2CTCTokenizer.from_pretrained(str(tmp_path / "model"))
    with torch.no_grad():
        logits = model.eval()(**features(audio, sampling_rate=16000, return_tensors="pt")).logits
    greedy = tokenizer.decode(logits.argmax(-1)[0])
    assert greedy and asr({"raw": audio, "sampling_rate": 16000})["text"] == greedy
    from asr_dist.decode import _beam_decoder

    beam = _beam_decoder(str(tmp_path / "model"), None)
    assert beam is not None and beam.settings()["lm"] == carried["lm"] and beam.alpha == 0.7
    assert _beam_decoder(str(tmp_path / "model"), {"greedy": True}) is None
