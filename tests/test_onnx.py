"""ONNX export: the exported model's logits equal the PyTorch model's on real-length, padded, batched input,
and `transcribe --onnx` writes the transcripts the PyTorch pipeline writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from asr_dist.audio import normalize
from asr_dist.cli import main
from asr_dist.onnx_export import OnnxCTC, OnnxError
from trainkit import dev_audio, save_random_model

pytestmark = pytest.mark.slow  # exports a model and transcribes with two engines (about 15 s)


@pytest.fixture(scope="module")
def exported(train_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    model = save_random_model(train_shards / "s-train", root / "model")
    assert main(["export-onnx", "--model", str(model), "--output", str(root / "onnx"), "--int8"]) == 0
    return model, root / "onnx"


def test_onnx_logits_equal_pytorch_on_padded_batches_of_real_lengths(train_shards, exported):
    from transformers import Wav2Vec2ForCTC

    model_dir, onnx_dir = exported
    record = json.loads((onnx_dir / "onnx.json").read_text())
    assert record["inputs"] == ["input_values", "attention_mask"] and set(record["files"]) == {"model.onnx",
                                                                                                "model.int8.onnx"}
    assert record["files"]["model.onnx"]["max_logit_difference"] < 1e-4
    assert record["files"]["model.int8.onnx"]["greedy_frame_agreement"] > 0.9
    beside = {p.name for p in onnx_dir.iterdir()}
    assert {"vocab.json", "tokenizer_config.json", "asr_dist.json", "config.json"} <= beside, beside
    assert not any(name.endswith(".safetensors") for name in beside)
    torch_model = Wav2Vec2ForCTC.from_pretrained(str(model_dir)).eval()
    clips = sorted(dev_audio(train_shards).values(), key=len)[:5]
    assert len({len(c) for c in clips}) == 5  # five lengths: four of them padded
    width = max(len(c) for c in clips)
    x = torch.zeros(len(clips), width)
    mask = torch.zeros(len(clips), width, dtype=torch.int64)
    for i, c in enumerate(clips):
        x[i, :len(c)] = torch.from_numpy(normalize(c))
        mask[i, :len(c)] = 1
    with torch.no_grad():
        expected = torch_model(x, attention_mask=mask).logits
    got = OnnxCTC(onnx_dir)(input_values=x, attention_mask=mask).logits
    assert got.shape == expected.shape
    frames = torch_model._get_feat_extract_output_lengths(mask.sum(1))
    for i, n in enumerate(frames.tolist()):  # the frames of each utterance's own audio
        torch.testing.assert_close(got[i, :n], expected[i, :n], rtol=0, atol=1e-4)


def test_transcribe_onnx_writes_the_pytorch_transcripts(train_shards, exported, tmp_path, capsys):
    model_dir, onnx_dir = exported
    paths = []
    for key, audio in sorted(dev_audio(train_shards).items())[:4]:
        paths.append(str(tmp_path / f"{key}.wav"))
        sf.write(paths[-1], audio, 16000)
    assert main(["transcribe", "--model", str(model_dir), "--no-lm", *paths]) == 0
    pytorch = capsys.readouterr().out.splitlines()
    assert main(["transcribe", "--model", str(onnx_dir), "--onnx", "--no-lm", *paths]) == 0
    onnx = capsys.readouterr().out.splitlines()
    assert len(pytorch) == 4 and all(line.split("\t")[1] for line in pytorch)  # the random head spells something
    assert onnx == pytorch
    assert main(["transcribe", "--model", str(onnx_dir), "--onnx", "--int8", "--no-lm", *paths]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    with pytest.raises(OnnxError, match="no model.onnx"):
        OnnxCTC(model_dir)
    assert main(["transcribe", "--model", str(model_dir), "--int8", paths[0]]) == 2
    assert "give --onnx too" in capsys.readouterr().err


@pytest.mark.parametrize("family,position", [("wavlm", None), ("wav2vec2-conformer", "relative"),
                                             ("wav2vec2-conformer", "rotary"), ("wav2vec2-bert", None)])
def test_every_family_exports_and_its_chunked_logits_equal_pytorch(train_shards, tmp_path, family, position):
    """The other families export too (WavLM's gated relative-position bias, the conformer's positions, w2v-BERT's
    fbank input and per-frame mask), checked at lengths other than the traced one: the chunked logits of a
    long recording, as `transcribe --onnx` computes them, equal PyTorch's."""
    from asr_dist.config import ModelArgs
    from asr_dist.decode import chunked_logits
    from asr_dist.export import write_processor
    from asr_dist.models import build_model, load_for_inference
    from asr_dist.text import load_vocab

    vocab = load_vocab(train_shards / "s-train" / "vocab.json")
    model, fam = build_model(ModelArgs(preset="tiny", family=family), vocab, seed=0)
    if position is not None:
        model.config.position_embeddings_type = position
        model = type(model)(model.config)
    model_dir = tmp_path / "model"
    model.save_pretrained(str(model_dir))
    write_processor(vocab, fam, model_dir)
    assert main(["export-onnx", "--model", str(model_dir), "--output", str(tmp_path / "onnx")]) == 0
    record = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert record["family"] == family and record["files"]["model.onnx"]["max_logit_difference"] < 1e-4
    torch_model, _ = load_for_inference(model_dir, torch.device("cpu"))
    onnx_model = OnnxCTC(tmp_path / "onnx")
    for audio in sorted(dev_audio(train_shards).values(), key=len)[:2]:
        x = np.concatenate([audio, audio, audio])  # several overlapping windows, the last one short
        want = chunked_logits(torch_model, x, 32000, 4000, 4, torch.device("cpu"))
        got = chunked_logits(onnx_model, x, 32000, 4000, 4, torch.device("cpu"))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
