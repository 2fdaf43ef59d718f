"""The model seam: every family builds from a base checkpoint of its own kind (and only of its kind),
counts its frames and FLOPs, and refuses, when the config is read, what it cannot do."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers

from asr_dist.config import ConfigError, ModelArgs
from asr_dist.data.samples import collate
from asr_dist.flops import train_flops_per_audio_second
from asr_dist.models import FAMILIES, ModelError, build_model, family_for
from asr_dist.plan import load_run_config
from trainkit import save_base_model

VOCAB = {c: i for i, c in enumerate(["[PAD]", "[UNK]", "|", *"abcdefghij"])}
BASE = ["output_dir=x", "data.train_shards=[x]", "train.max_steps=1"]


def loss_and_grads(model, x, labels, **inputs):
    """One forward and backward from the same random state (SpecAugment's and LayerDrop's draws): the
    output and every parameter's gradient."""
    torch.manual_seed(5)
    np.random.seed(5)
    model.zero_grad()
    out = model(x, labels=labels, **inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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


ARGS = dict(mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.2, mask_feature_length=8, hidden_dropout=0.1,
            attention_dropout=0.1, activation_dropout=0.1, feat_proj_dropout=0.1, final_dropout=0.1, layerdrop=0.3)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.sync_free])
def test_sync_free_forward_trains_like_transformers_in_every_family_that_has_it(name):
    """The same loss, logits and gradients as the family's own transformers forward, with SpecAugment,
    every dropout and LayerDrop drawing from the same generators, on a padded batch."""
    torch.manual_seed(0)
    hf, family = build_model(ModelArgs(preset="tiny", family=name, **ARGS), VOCAB)
    hf.train()
    ours = copy.deepcopy(hf)
    assert family.use_sync_free_forward(ours)
    lengths = torch.tensor([16000, 12000, 9000])
    mask = torch.arange(16000)[None] < lengths[:, None]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16000, generator=g) * mask
    labels = torch.full((3, 8), -100)
    for i in range(3):
        labels[i, : 3 + i] = torch.randint(3, len(VOCAB), (3 + i,), generator=g)

    a, grads_a = loss_and_grads(hf, x, labels, attention_mask=mask)
    b, grads_b = loss_and_grads(ours, x, labels, lengths=lengths)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and f"{family.base_attr}.masked_spec_embed" in grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if not f.sync_free])
def test_families_without_the_sync_free_forward_keep_transformers_forward(name):
    model, family = build_model(ModelArgs(preset="tiny", family=name), VOCAB)
    forward = model.forward
    assert not family.use_sync_free_forward(model) and model.forward == forward


def test_flops_follow_the_family_layout():
    """A conformer layer (two feed-forward blocks, a convolution module, relative positions) costs more
    than a transformer layer of the same width; data2vec-audio's five small positional convolutions cost
    less than wav2vec2's one large one."""
    w2v, conformer, d2v = (FAMILIES[n].preset_config("xlsr-300m" if n == "wav2vec2" else "large", vocab_size=40)
                           for n in ("wav2vec2", "wav2vec2-conformer", "data2vec-audio"))
    f = {n: FAMILIES[n] for n in ("wav2vec2", "wav2vec2-conformer", "data2vec-audio")}
    assert f["wav2vec2-conformer"].layer_flops(conformer, 400) > 1.4 * f["wav2vec2"].layer_flops(w2v, 400)
    assert f["data2vec-audio"].positional_flops(d2v, 400) < f["wav2vec2"].positional_flops(w2v, 400)
    assert train_flops_per_audio_second(conformer, 8.0, True) > train_flops_per_audio_second(w2v, 8.0, True)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "wav2vec2"])
def test_each_family_s_starting_config_loads_and_refuses_another_family(name, tmp_path):
    """configs/<family>.yaml reads with a checkpoint of its family; pointed at another family's, it still
    loads (the family comes from config.json), and model.family pins it."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    d = save_base_model(name, tmp_path / name)
    cfg = load_run_config(str(config), [f"model.pretrained={d}"])
    assert bool(cfg.model.freeze_feature_encoder) == FAMILIES[name].has_front_end
    assert cfg.distributed.precision == "fp16"
    other = save_base_model("wav2vec2", tmp_path / "w2v")
    with pytest.raises(ModelError, match="is a wav2vec2 checkpoint"):
        load_run_config(str(config), [f"model.pretrained={other}", f"model.family={name}"])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradient_checkpointing_trains_alike_in_every_family(name):
    """model.gradient_checkpointing: the same loss and gradients, with the layers' activations recomputed."""
    torch.manual_seed(0)
    plain, family = build_model(ModelArgs(preset="tiny", family=name, mask_time_prob=0.0), VOCAB)
    checkpointed = copy.deepcopy(plain)
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    assert checkpointed.is_gradient_checkpointing
    audio = torch.randn(2, 12000, generator=torch.Generator().manual_seed(0)).numpy()
    batch = collate([("a", family.featurizer()(audio[0]), [3, 4, 5, 6], ""),
                     ("b", family.featurizer()(audio[1, :8000]), [7, 8], "")], seconds=[0.75, 0.5])
    x, mask, labels = batch["input_values"], batch["attention_mask"], batch["labels"]
    grads = []
    for model in (plain.train(), checkpointed.train()):
        torch.manual_seed(1)  # the conformer's convolution module keeps its checkpoint's dropout (0.1)
        out = model(x, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads.append((out.loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6) and grads[0][1].keys() == grads[1][1].keys()
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-5, atol=1e-6, msg=n)


# ── MMS adapter-only training ──

def _mms_checkpoint(out, adapter_attn_dim=8):
    """A random tiny wav2vec2 CTC model with attention adapters in every layer, saved as mms-1b-all is
    published (adapters and a head for another vocabulary, here of 20 ids)."""
    torch.manual_seed(7)
    config = transformers.Wav2Vec2Config(**FAMILIES["wav2vec2"].presets["tiny"], adapter_attn_dim=adapter_attn_dim,
                                         vocab_size=20)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(str(out))
    return out


ADAPTERS = ["model.train_adapters_only=true", "model.adapter_language=dan"]


def test_adapter_only_training_trains_the_adapters_and_head_alone(tmp_path, caplog):
    """From an MMS-like checkpoint (its adapters drawn anew, its width kept), from a base checkpoint without
    adapters (new ones, MMS's width 16) and from a preset: only the adapters and the CTC head train, and
    every other weight is the checkpoint's."""
    mms = _mms_checkpoint(tmp_path / "mms")
    base = save_base_model("wav2vec2", tmp_path / "base")
    saved = transformers.Wav2Vec2ForCTC.from_pretrained(str(mms)).state_dict()
    for source, width in ((f"model.pretrained={mms}", 8), (f"model.pretrained={base}", 16), ("model.preset=tiny", 16)):
        cfg = load_run_config(None, BASE + [source, *ADAPTERS])
        with caplog.at_level("INFO", logger="asr_dist.models"):
            model, family = build_model(cfg.model, VOCAB)
        assert model.config.adapter_attn_dim == width
        adapters = family.adapter_weights(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(adapters) and {p for p in family.trainable_parameters(model)} == set(adapters.values())
        assert {n.split(".")[0] for n in trainable} == {"wav2vec2", "lm_head"}
        assert len([n for n in trainable if ".adapter_layer." in n]) == 4 * 6  # 4 layers x (norm, 2 linear) x (w, b)
        head = 2 * (192 * width) + width + 192 * 3  # per layer: two projections, their biases, the norm and its bias
        assert sum(p.numel() for p in adapters.values()) == 4 * head + 192 * len(VOCAB) + len(VOCAB)
        assert "trainable: adapters only (dan" in caplog.text
        caplog.clear()
        if source.endswith(str(mms)):
            state = model.state_dict()
            for k, v in saved.items():
                if k in adapters:  # drawn anew, as MMS's recipe does for a new language
                    assert k.startswith("lm_head") or k.endswith("bias") or k.endswith("norm.weight") or \
                        not torch.equal(v, state[k]), k
                else:
                    torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    # model.adapter_attn_dim overrides the checkpoint's width
    cfg = load_run_config(None, BASE + [f"model.pretrained={mms}", *ADAPTERS, "model.adapter_attn_dim=4"])
    assert build_model(cfg.model, VOCAB)[0].config.adapter_attn_dim == 4


def test_adapter_only_settings_that_cannot_work_are_refused_when_read(tmp_path):
    hubert = save_base_model("hubert", tmp_path / "hubert")
    cases = [
        ([f"model.pretrained={hubert}", *ADAPTERS], "hubert: transformers' HubertForCTC has no attention adapters"),
        (["model.preset=tiny", "model.family=wav2vec2-conformer", *ADAPTERS], "Wav2Vec2ConformerForCTC has no"),
        (["model.preset=base", *ADAPTERS], "model.preset=base has wav2vec2's post-norm layout"),
        (["model.preset=tiny", "model.train_adapters_only=true"], "needs model.adapter_language"),
        (["model.preset=tiny", "model.adapter_language=dan"], "model.train_adapters_only is false"),
        (["model.preset=tiny", "model.adapter_attn_dim=8"], "model.train_adapters_only is false"),
        (["model.preset=tiny", "model.train_adapters_only=true", "model.adapter_language=../x"], "part of a file name"),
        (["model.preset=tiny", *ADAPTERS, "model.adapter_attn_dim=0"], "give at least 1"),
        (["model.preset=tiny", *ADAPTERS, "model.freeze_feature_encoder=false"], "freezes the whole encoder"),
    ]
    for overrides, message in cases:
        with pytest.raises(ModelError, match=message):
            load_run_config(None, BASE + overrides)


def test_sync_free_forward_with_adapters_trains_like_transformers():
    """The adapter inside each encoder layer: the same loss, logits and adapter gradients either way."""
    torch.manual_seed(0)
    hf, family = build_model(ModelArgs(preset="tiny", train_adapters_only=True, adapter_language="dan", **ARGS), VOCAB)
    with torch.no_grad():  # adapters that change the hidden states (their fresh init is near zero)
        for name, p in family.adapter_weights(hf).items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    hf.train()
    ours = copy.deepcopy(hf)
    assert family.use_sync_free_forward(ours)
    lengths = torch.tensor([16000, 11000])
    mask = torch.arange(16000)[None] < lengths[:, None]
    x = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1)) * mask
    labels = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 3, -100, -100]])

    a, grads_a = loss_and_grads(hf, x, labels, attention_mask=mask)
    b, grads_b = loss_and_grads(ours, x, labels, lengths=lengths)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    assert set(grads_a) == set(grads_b) and "lm_head.weight" in grads_a  # (LayerDrop skips some layers' adapters)
    assert set(grads_a) <= set(family.adapter_weights(hf)) and any(".adapter_layer." in n for n in grads_a)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7, msg=n)


def test_the_adapter_file_holds_what_load_adapter_reads(tmp_path):
    """adapter.<lang>.safetensors: exactly the adapter and head tensors; loaded by transformers' load_adapter
    into a model with other adapters, it gives the model's logits."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model, family = build_model(ModelArgs(preset="tiny", train_adapters_only=True, adapter_language="dan"), VOCAB)
    with torch.no_grad():
        for p in family.adapter_weights(model).values():
            p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(str(tmp_path))
    path = family.write_adapter(model.state_dict(), model, "dan", tmp_path)
    assert path.name == "adapter.dan.safetensors"
    assert set(load_file(str(path))) == set(model._get_adapters())
    x = torch.randn(1, 16000)
    expected = model.eval()(x).logits
    other = transformers.Wav2Vec2ForCTC.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        for p in other._get_adapters().values():
            p.normal_()
    assert not torch.allclose(other(x).logits, expected)
    other.load_adapter("dan")
    torch.testing.assert_close(other(x).logits, expected, rtol=0, atol=1e-6)


# ── CTC frames: can the model align an utterance? ──

def test_ctc_frames_match_wav2vec2():
    from asr_dist.frames import num_ctc_frames

    model = transformers.Wav2Vec2Config()
    for n in (400, 16000, 16000 * 7 + 123):
        # the formula transformers uses to size attention masks
        expected = n
        for k, s in zip(model.conv_kernel, model.conv_stride):
            expected = (expected - k) // s + 1
        assert num_ctc_frames(n) == expected
    assert num_ctc_frames(100) == 0


def test_the_alignment_check_agrees_with_the_ctc_loss():
    """Alignable exactly when transformers' CTC loss (without ctc_zero_infinity) is finite, for labels with
    and without repeats, at the bound and one past it; the check survives pickling (the loader's workers)."""
    import pickle

    torch.manual_seed(0)
    model, family = build_model(ModelArgs(preset="tiny"), VOCAB)
    model.config.ctc_zero_infinity = False
    check = pickle.loads(pickle.dumps(family.alignment_check(model.config)))
    n = 16000
    frames = check(n, [])[0]
    with torch.no_grad():
        logits_frames = model.eval()(torch.randn(1, n)).logits.shape[1]
    assert frames == logits_frames == family.audio_frames(model.config, n) == 49
    distinct = [3 + i % 2 for i in range(frames)]  # alternating: no repeats, one frame a label
    same = [5] * ((frames + 1) // 2)  # all equal: a blank between each pair
    cases = [distinct, distinct + [4], same, same + [5], [3, 3, 4] * 12, [3, 3, 4] * 12 + [4]]
    for labels in cases:
        got, need = check(n, labels)
        with torch.no_grad():
            loss = model(torch.randn(1, n), labels=torch.tensor([labels])).loss
        assert bool(torch.isfinite(loss)) == (got >= need), (len(labels), need, got, loss)
    assert [check(n, c)[1] for c in cases] == [49, 50, 49, 51, 48, 50]
    assert check(100, [3])[0] == 0  # shorter than one frame
    # plain Python for the loader's workers (no model to build there); a family whose frames are
    # not convolution steps is asked itself
    from asr_dist.frames import num_ctc_frames

    assert check.frames.func is num_ctc_frames

    class Halved(type(family)):
        name = "halved"

        def audio_frames(self, config, num_samples):
            return super().audio_frames(config, num_samples) // 2

    halved = Halved().alignment_check(model.config)
    assert halved(n, distinct[:24]) == (24, 24) and pickle.loads(pickle.dumps(family.alignment_check(model.config)))(
        n, distinct) == (49, 49)


def test_the_frames_follow_the_model_layout():
    """A strided adapter (three layers of stride 2) gives an eighth of the frames, as the model computes them."""
    config = transformers.Wav2Vec2Config(add_adapter=True, num_adapter_layers=3, adapter_stride=2, vocab_size=12,
                                         **FAMILIES["wav2vec2"].presets["tiny"])
    model = transformers.Wav2Vec2ForCTC(config)
    family = FAMILIES["wav2vec2"]
    for n in (16000, 40000):
        assert family.audio_frames(config, n) == int(model._get_feat_extract_output_lengths(n))
    assert family.audio_frames(config, 16000) == 7
    from asr_dist.frames import WAV2VEC2_CONV  # the layout tests/data/test_loader.py skips utterances with

    stride3 = transformers.Wav2Vec2Config(add_adapter=True, num_adapter_layers=1, adapter_stride=3)
    assert family.alignment_check(stride3).frames.keywords["conv"] == WAV2VEC2_CONV + ((1, 3),)
