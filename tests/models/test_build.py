"""The model seam: every family builds from a base checkpoint of its own kind (and only of its kind),
counts its frames and FLOPs, and refuses, when the config is read, what it cannot do. (The forward:
test_forward.py; adapter-only training: test_adapters.py; frames and FLOPs of each layout: test_frames.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from asr_dist.config import ConfigError, ModelArgs
from asr_dist.flops import train_flops_per_audio_second
from asr_dist.models import FAMILIES, ModelError, build_model, family_for
from asr_dist.plan import load_run_config
from trainkit import save_base_model

VOCAB = {c: i for i, c in enumerate(["[PAD]", "[UNK]", "|", *"abcdefghij"])}
BASE = ["output_dir=x", "data.train_shards=[x]", "train.max_steps=1"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_base_checkpoint_gets_a_ctc_head_and_keeps_every_encoder_weight(name, tmp_path):
    d = save_base_model(name, tmp_path / "base", seed=3)
    base = transformers.AutoModel.from_pretrained(str(d))
    cfg = load_run_config(None, BASE + [f"model.pretrained={d}"])  # the family is read from config.json
    model, family = build_model(cfg.model, VOCAB)
    assert family.name == name and type(model) is family.ctc_class and model.config.model_type == base.config.model_type
    assert model.lm_head.out_features == len(VOCAB) and model.config.pad_token_id == 0
    state = model.state_dict()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(state[f"{family.base_attr}.{k}"], v, msg=k)
    # a pretrained front end is frozen by default (where the family has one); the rest trains
    if family.has_front_end:
        assert not any(p.requires_grad for p in family.front_end(model).parameters())
    else:
        assert family.front_end(model) is None
    assert all(p.requires_grad for n, p in model.named_parameters() if "feature_extractor" not in n)
    # the frames: the family's count is the model's own, for single lengths and batches of them
    for n in (400, 639, 16000, 16001, 23456):
        assert family.output_frames(model.config, n) == int(model._get_feat_extract_output_lengths(n)), n
    lengths = torch.tensor([16000, 8000, 5000])
    assert torch.equal(family.output_frames(model.config, lengths), model._get_feat_extract_output_lengths(lengths))
    with torch.no_grad():
        logits = model.eval()(**{family.input_name: torch.from_numpy(family.featurizer()(
            np.random.default_rng(0).standard_normal(16000).astype(np.float32)))[None]}).logits
    assert logits.shape == (1, family.audio_frames(model.config, 16000), len(VOCAB))
    # FLOPs: counted for every family; a frozen front end costs less; longer utterances cost more per second
    frozen, trained = (train_flops_per_audio_second(model.config, 4.0, f) for f in (True, False))
    assert 0 < frozen < trained < 3e9 if family.has_front_end else 0 < frozen == trained < 3e9
    assert train_flops_per_audio_second(model.config, 12.0, True) > frozen


@pytest.mark.parametrize("model_type", ["whisper", "bert"])
def test_a_checkpoint_of_another_kind_is_refused_by_name(model_type, tmp_path):
    """Never reinterpreted as wav2vec2 (which transformers would only warn about): the model type and
    the supported ones are named, when the config is read and when a model directory is loaded."""
    from asr_dist.decode import ModelDirError, load_model_dir

    d = tmp_path / model_type
    transformers.AutoConfig.for_model(model_type).save_pretrained(str(d))
    with pytest.raises(ModelError, match=rf"model_type '{model_type}' is not a CTC encoder family.*supported: "
                                         r"wav2vec2, hubert, wavlm, data2vec-audio, wav2vec2-conformer"):
        load_run_config(None, BASE + [f"model.pretrained={d}"])
    (d / "vocab.json").write_text(json.dumps(VOCAB))
    with pytest.raises(ModelDirError, match=f"model_type '{model_type}'"):
        load_model_dir(str(d), torch.device("cpu"))
    with pytest.raises(ModelError, match="'whisper'"):
        family_for("whisper")
    assert isinstance(ModelError("x"), ConfigError)  # the CLI reports it as a config error: no traceback


def test_model_settings_a_family_cannot_honour_are_refused_when_read(tmp_path):
    hubert = save_base_model("hubert", tmp_path / "hubert")
    cases = [
        ([f"model.pretrained={hubert}", "model.family=wavlm"], "is a hubert checkpoint; leave model.family out"),
        (["model.preset=tiny", "model.family=conformer"], "model.family='conformer'; choose one of wav2vec2, hubert"),
        (["model.preset=base", "model.family=wav2vec2-conformer"], "model.preset='base' for the wav2vec2-conformer"),
        (["model.preset=tiny", "model.family=wavlm", "model.attention=sdpa"], "implements its attention as eager only"),
        (["model.preset=tiny", "model.family=wav2vec2-conformer", "model.attention=flash_attention_2"],
         "as sdpa or eager only"),
        (["model.preset=tiny", "model.family=wav2vec2-conformer", "model.fft_positional_conv=true"],
         "no single grouped positional convolution"),
        (["model.preset=tiny", "model.family=data2vec-audio", "model.fft_positional_conv=true"],
         "no single grouped positional convolution"),
        (["model.preset=tiny", "model.family=wav2vec2-conformer", "model.compile=true"],
         "wav2vec2-conformer: torch.compile builds new graphs for every new batch length"),
        (["model.preset=tiny", "model.family=wav2vec2-bert", "model.compile=true"],
         "wav2vec2-bert: torch.compile builds new graphs for every new batch length"),
    ]
    for overrides, message in cases:
        with pytest.raises(ModelError, match=message):
            load_run_config(None, BASE + overrides)
    # what works: WavLM's attention defaults to its one kernel; the presets name their family
    cfg = load_run_config(None, BASE + ["model.preset=tiny", "model.family=wavlm"])
    model, family = build_model(cfg.model, VOCAB)
    assert model.config._attn_implementation == "eager" and type(model) is transformers.WavLMForCTC
    assert load_run_config(None, BASE + [f"model.pretrained={hubert}", "model.family=hubert"]).model.family == "hubert"
    assert load_run_config(None, BASE + [f"model.pretrained={hubert}", "model.compile=true"]).model.compile


def test_no_family_without_a_front_end_is_asked_to_freeze_one():
    """model.freeze_feature_encoder=true is refused for a family whose input is not the waveform."""
    class NoFrontEnd(type(FAMILIES["wav2vec2"])):
        name, has_front_end, input_name = "no-front-end", False, "input_features"

    with pytest.raises(ModelError, match="no-front-end: it has no convolutional feature encoder to freeze"):
        NoFrontEnd().check(ModelArgs(preset="tiny", freeze_feature_encoder=True), zero_stage=1)
    NoFrontEnd().check(ModelArgs(preset="tiny", freeze_feature_encoder=False), zero_stage=1)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "wav2vec2"])
def test_each_family_s_starting_config_loads_and_refuses_another_family(name, tmp_path):
    """configs/<family>.yaml reads with a checkpoint of its family; pointed at another family's, it still
    loads (the family comes from config.json), and model.family pins it."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    d = save_base_model(name, tmp_path / name)
    cfg = load_run_config(str(config), [f"model.pretrained={d}"])
    assert bool(cfg.model.freeze_feature_encoder) == FAMILIES[name].has_front_end
    assert cfg.distributed.precision == "fp16"
    other = save_base_model("wav2vec2", tmp_path / "w2v")
    with pytest.raises(ModelError, match="is a wav2vec2 checkpoint"):
        load_run_config(str(config), [f"model.pretrained={other}", f"model.family={name}"])
