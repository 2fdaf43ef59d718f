"""w2v-BERT 2.0 (wav2vec2-bert): its input is transformers' stacked log-mel fbank, made in the loader's
workers; its CTC frames are counted as transformers counts them, with and without the adapter; what it
cannot do is refused when the config is read."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import transformers

from asr_dist.config import ModelArgs
from asr_dist.data import index as fmt
from asr_dist.data.loader import TrainLoader
from asr_dist.data.samples import collate, input_padding
from asr_dist.data.shardset import ShardSet
from asr_dist.flops import train_flops_per_audio_second
from asr_dist.models import FAMILIES, ModelError, build_model
from asr_dist.models.ctc import ctc_loss
from asr_dist.models.wav2vec2_bert import FeatureError, fbank_frames, stacked_fbank
from asr_dist.plan import load_run_config
from trainkit import save_base_model

VOCAB = {c: i for i, c in enumerate(["[PAD]", "[UNK]", "|", *"abcdefghij"])}
BASE = ["output_dir=x", "data.train_shards=[x]", "train.max_steps=1"]
BERT = FAMILIES["wav2vec2-bert"]


def _audio(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _batch(lengths, seed=0):
    """A padded micro-batch of featurised random audio, as the loader's workers make it."""
    g = torch.Generator().manual_seed(seed)
    samples = [(f"u{i}", stacked_fbank(_audio(n, seed + i)), torch.randint(3, len(VOCAB), (3 + i,), generator=g).tolist(),
                "") for i, n in enumerate(lengths)]
    return collate(samples, seconds=[n / 16000 for n in lengths])


# lengths whose fbank frame counts (1 + (n - 400) // 160) are odd and even
LENGTHS = [560, 719, 720, 880, 16000, 16161, 16320, 40000, 40159]


def test_featurizer_is_seamless_m4t_s_extractor_in_the_frames_it_attends():
    """Equal to SeamlessM4TFeatureExtractor's input_features within 1e-4 over the frames its attention mask
    keeps; an odd fbank count gives it one more, half-padded, masked frame, which the featuriser leaves out."""
    fe = transformers.SeamlessM4TFeatureExtractor()
    odd = 0
    for n in LENGTHS:
        x = _audio(n, seed=n)
        ref = fe(x, sampling_rate=16000, return_tensors="np")
        kept = int(ref["attention_mask"][0].sum())
        ours = stacked_fbank(x)
        assert ours.dtype == np.float32 and ours.shape == (kept, 160) == (fbank_frames(n), 160), n
        np.testing.assert_allclose(ours, ref["input_features"][0, :kept], atol=1e-4, rtol=0)
        fbank = 1 + (n - 400) // 160
        assert ref["input_features"].shape[1] == kept + fbank % 2
        odd += fbank % 2
    assert 0 < odd < len(LENGTHS)
    assert pickle.loads(pickle.dumps(stacked_fbank)) is stacked_fbank  # it travels to the loader's workers
    assert torch.equal(fbank_frames(torch.tensor(LENGTHS)), torch.tensor([fbank_frames(n) for n in LENGTHS]))
    with pytest.raises(FeatureError, match="an utterance of 500 samples .*at least 560"):
        stacked_fbank(_audio(500))


@pytest.mark.parametrize("adapter", [dict(add_adapter=False), dict(add_adapter=True),
                                     dict(add_adapter=True, num_adapter_layers=2)])
def test_frames_are_transformers_own_with_and_without_the_adapter(adapter):
    model = BERT.ctc_class(BERT.preset_config("tiny", vocab_size=len(VOCAB), **adapter))
    lengths = torch.arange(1, 600)
    assert torch.equal(BERT.output_frames(model.config, lengths), model._get_feat_extract_output_lengths(lengths))
    for n in (1, 2, 7, 50, 51, 299):
        assert BERT.output_frames(model.config, n) == int(model._get_feat_extract_output_lengths(n)), n
    # from samples of audio: the featuriser's framing, then the adapter; the logits have that many frames
    with torch.no_grad():
        for n in (720, 16161, 24000):
            x = torch.from_numpy(stacked_fbank(_audio(n)))[None]
            assert model.eval()(input_features=x).logits.shape[1] == BERT.audio_frames(model.config, n), n
    assert torch.equal(BERT.audio_frames(model.config, torch.tensor([720, 16161])),
                       torch.tensor([BERT.audio_frames(model.config, 720), BERT.audio_frames(model.config, 16161)]))


def test_a_base_checkpoint_with_an_adapter_keeps_it_and_one_without_gets_a_new_one(tmp_path):
    with_adapter = save_base_model("wav2vec2-bert", tmp_path / "with", seed=3, add_adapter=True)
    model, family = build_model(load_run_config(None, BASE + [f"model.pretrained={with_adapter}"]).model, VOCAB)
    base = transformers.AutoModel.from_pretrained(str(with_adapter))
    state = model.state_dict()
    assert model.config.add_adapter and any(".adapter." in k for k in state)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(state[f"wav2vec2_bert.{k}"], v, msg=k)
    assert family.front_end(model) is None and all(p.requires_grad for p in model.parameters())
    # model.add_adapter=true on a checkpoint without one: a new adapter, as the head; the rest is kept
    plain = save_base_model("wav2vec2-bert", tmp_path / "plain", seed=3)
    model, _ = build_model(load_run_config(None, BASE + [f"model.pretrained={plain}", "model.add_adapter=true"]).model,
                           VOCAB)
    assert model.config.add_adapter and model.lm_head.in_features == model.config.output_hidden_size
    # a checkpoint that says it has an adapter but holds none is not a complete checkpoint
    cfg = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**cfg, "add_adapter": True}))
    with pytest.raises(ModelError, match=r"weights of the wav2vec2-bert encoder are not in the checkpoint \(e.g. "
                                         r"wav2vec2_bert.adapter"):
        build_model(load_run_config(None, BASE + [f"model.pretrained={plain}"]).model, VOCAB)


def test_what_it_cannot_do_is_refused_when_read(tmp_path):
    adapter = save_base_model("wav2vec2-bert", tmp_path / "adapter", add_adapter=True)
    odd = save_base_model("wav2vec2-bert", tmp_path / "odd", add_adapter=True, adapter_kernel_size=5, adapter_stride=3)
    tiny = ["model.preset=tiny", "model.family=wav2vec2-bert"]
    cases = [
        (tiny + ["model.freeze_feature_encoder=true"],
         "wav2vec2-bert: it has no convolutional feature encoder to freeze \\(its input is input_features\\)"),
        (tiny + ["model.add_adapter=true", "model.layerdrop=0.1"], "with the wav2vec2-bert adapter"),
        ([f"model.pretrained={adapter}", "model.layerdrop=0.1"], "skip its strided layers too"),
        ([f"model.pretrained={odd}"], "adapter_kernel_size=5 with adapter_stride=3: .*pads 1 frames but counts its CTC frames with 2"),
        (tiny + ["model.attention=flash_attention_2"], "as sdpa or eager only"),
        (tiny + ["model.fft_positional_conv=true"], "no single grouped positional convolution"),
        (["model.preset=tiny", "model.add_adapter=true"], "model.add_adapter=true for wav2vec2: .*wav2vec2-bert setting"),
        (["model.preset=600M", "model.family=wav2vec2-bert"], "choose one of tiny, 600m"),
    ]
    for overrides, message in cases:
        with pytest.raises(ModelError, match=message):
            load_run_config(None, BASE + overrides)
    # what works: LayerDrop without the adapter, and the adapter without LayerDrop; no front end to freeze by default
    load_run_config(None, BASE + tiny + ["model.layerdrop=0.1"])
    cfg = load_run_config(None, BASE + [f"model.pretrained={adapter}", "model.add_adapter=false", "model.layerdrop=0.1"])
    model, _ = build_model(cfg.model, VOCAB)
    assert not model.config.add_adapter and model.config.layerdrop == 0.1


def test_collate_pads_feature_frames_with_a_mask_over_frames():
    lengths = [16000, 9000, 24000]
    batch = _batch(lengths)
    frames = [fbank_frames(n) for n in lengths]
    assert batch["input_values"].shape == (3, max(frames), 160) and batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].sum(-1).tolist() == frames
    assert float(batch["input_values"][1, frames[1]:].abs().sum()) == 0.0
    torch.testing.assert_close(batch["input_values"][0, :frames[0]], torch.from_numpy(stacked_fbank(_audio(16000))))
    assert batch["durations"].tolist() == pytest.approx([n / 16000 for n in lengths])
    # data.pad_to_multiple_of counts samples: 16000 is 50 feature frames
    assert input_padding(stacked_fbank, 16000) == 50 and input_padding(stacked_fbank, 1) == 1
    samples = [("a", stacked_fbank(_audio(9000)), [3], "")]
    assert collate(samples, input_padding(stacked_fbank, 16000), [0.5])["input_values"].shape == (1, 50, 160)


@pytest.mark.parametrize("adapter", [False, True])
def test_a_train_step_through_transformers_forward(adapter):
    """The tiny model trains on a padded batch (SpecAugment on): a finite loss equal to the CTC loss of
    evaluation's frame count, finite gradients everywhere, in fp32 and bf16 (gradient checkpointing: in
    test_forward.py, for every family)."""
    torch.manual_seed(0)
    args = ModelArgs(preset="tiny", family="wav2vec2-bert", add_adapter=adapter, mask_time_prob=0.1,
                     mask_time_length=2)
    model, family = build_model(args, VOCAB)
    assert not family.use_sync_free_forward(model)
    batch = _batch([16000, 9000, 12000])
    model.train()
    torch.manual_seed(1)
    out = model(**{family.input_name: batch["input_values"]}, attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values()) and "lm_head.weight" in grads
    assert any(".adapter." in n for n in grads) == adapter
    frames = family.output_frames(model.config, batch["attention_mask"].sum(-1))
    assert frames.tolist() == [family.audio_frames(model.config, n) for n in (16000, 9000, 12000)]
    assert out.logits.shape[1] == int(frames.max())
    assert float(ctc_loss(out.logits.detach(), batch["labels"], frames, 0)) == pytest.approx(out.loss.item(), rel=1e-5)
    model.to(torch.bfloat16)
    half = model(input_features=batch["input_values"].bfloat16(), attention_mask=batch["attention_mask"],
                 labels=batch["labels"])
    assert torch.isfinite(half.loss) and half.loss.item() == pytest.approx(out.loss.item(), rel=0.1)


def test_the_relative_key_bias_is_transformers_own_computed_per_distance():
    """asr-dist's relative-key bias (each query against the K distance embeddings, then gathered) gives
    transformers' einsum over every pair's embedding: the bias within float rounding, and the same logits,
    loss and gradients of a whole model over a padded batch longer than the clamp's reach (64 frames)."""
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as m

    from asr_dist.models import wav2vec2_bert as ours
    from asr_dist.models.wav2vec2_bert import relative_key_bias

    args = ModelArgs(preset="tiny", family="wav2vec2-bert", mask_time_prob=0.0)
    model, family = build_model(args, VOCAB)
    assert m._apply_relative_key_position_encoding is relative_key_bias  # the family installs it when it builds
    original = ours.transformers_relative_key_bias
    assert original.__module__ == m.__name__
    attention = model.wav2vec2_bert.encoder.layers[0].self_attn
    q, k = torch.randn(2, 4, 90, 48, dtype=torch.float64), torch.randn(2, 4, 90, 48, dtype=torch.float64)
    attention.double()
    assert torch.allclose(relative_key_bias(attention, q, k)[1], original(attention, q, k)[1], rtol=0, atol=1e-12)
    attention.float()
    batch = _batch([48000, 30000, 20000])  # 150 frames at 50 Hz: past the left and right clamps

    def run(bias):
        m._apply_relative_key_position_encoding = bias
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout
        out = model(input_features=batch["input_values"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        ours, ours_grads = run(relative_key_bias)
        theirs, theirs_grads = run(original)
    finally:
        m._apply_relative_key_position_encoding = relative_key_bias
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5) and ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-6)
    distance = [n for n in ours_grads if "distance_embedding" in n]
    assert distance and ours_grads.keys() == theirs_grads.keys()
    largest = max(float(g.abs().max()) for g in theirs_grads.values())
    for n in ours_grads:  # within 1e-4 of each tensor's own scale (a key bias's is rounding: softmax ignores it)
        scale = max(float(theirs_grads[n].abs().max()), 1e-3 * largest)
        assert float((ours_grads[n] - theirs_grads[n]).abs().max()) < 1e-4 * scale, n


def test_the_loader_delivers_feature_frames_and_resumes_exactly(tmp_path):
    from asr_dist.data.writer import BuildOptions, build
    from asr_dist.synth import write_corpus

    src = write_corpus(tmp_path / "corpus", "commonvoice", 16, seed=5)
    build(BuildOptions(inputs=[src], output=str(tmp_path / "shards"), shard_size=4, progress=False))
    kw = dict(rank=0, world_size=1, micro_batch_size=2, global_batch_size=4, num_workers=0, bucket_batches=2,
              featurize=stacked_fbank)
    whole = list(TrainLoader(str(tmp_path / "shards"), **kw))
    lengths = {loc.key: json.loads(loc.meta)["num_samples"] for s in ShardSet.open(str(tmp_path / "shards")).shards
               for loc in fmt.list_shard(s.path)}
    for b in whole:
        assert b["input_values"].dim() == 3 and b["input_values"].shape[2] == 160
        assert b["attention_mask"].sum(-1).tolist() == [fbank_frames(lengths[k]) for k in b["keys"]]
        assert b["durations"].tolist() == pytest.approx([lengths[k] / 16000 for k in b["keys"]])
    first = TrainLoader(str(tmp_path / "shards"), **kw)
    got = [next(iter(first))]
    second = TrainLoader(str(tmp_path / "shards"), **kw)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += list(second)
    assert [b["keys"] for b in got] == [b["keys"] for b in whole]
    for a, b in zip(got, whole):
        assert torch.equal(a["input_values"], b["input_values"])


def test_flops_and_the_600m_layout():
    """The 600m preset is transformers' Wav2Vec2BertConfig default (w2v-BERT 2.0's layout): about 580 M
    parameters, about 3 x 2 x 580 M x 50 frames of training FLOPs per audio second; the adapter halves the
    frames of the CTC head only."""
    config = BERT.preset_config("600m", vocab_size=40)
    default = transformers.Wav2Vec2BertConfig()
    for key in BERT.presets["600m"]:
        assert getattr(config, key) == getattr(default, key), key
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.Wav2Vec2BertModel(config).parameters())
    assert 560e6 < params < 620e6, params
    per_second = train_flops_per_audio_second(config, 8.0, frozen_feature_encoder=True)
    assert 0.9 < per_second / (3 * 2 * params * 50) < 1.3, per_second / 1e9
    assert per_second == train_flops_per_audio_second(config, 8.0, frozen_feature_encoder=False)  # nothing to freeze
    assert train_flops_per_audio_second(config, 8.0, True, layers=12) < 0.6 * per_second
    adapter = BERT.preset_config("600m", vocab_size=40, add_adapter=True)
    assert per_second < train_flops_per_audio_second(adapter, 8.0, True) < 1.1 * per_second


def test_the_export_s_processor_computes_the_training_features(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    processor = BERT.processor(tmp_path / "vocab.json")
    processor.save_pretrained(str(tmp_path / "export"))
    loaded = transformers.AutoProcessor.from_pretrained(str(tmp_path / "export"))
    assert type(loaded) is transformers.Wav2Vec2BertProcessor
    x = _audio(16161)
    out = loaded(audio=x, sampling_rate=16000, return_tensors="np")
    kept = int(out["attention_mask"][0].sum())
    np.testing.assert_allclose(out["input_features"][0, :kept], stacked_fbank(x), atol=1e-5)
    assert loaded.tokenizer.decode([3, 4, 2, 5]) == "ab c"


@pytest.mark.parametrize("adapter", [False, True])
def test_long_audio_is_transcribed_in_chunks_of_feature_frames(adapter):
    """transcribe --lm's chunking: each window featurised on its own and padded as (B, F, 160); the
    windows' logits joined without their context frames cover the recording at 50 (25) frames a second."""
    from asr_dist.decode import chunked_logits

    torch.manual_seed(0)
    model = BERT.ctc_class(BERT.preset_config("tiny", vocab_size=len(VOCAB), add_adapter=adapter)).eval()
    audio = _audio(23 * 16000 + 123)
    logits = chunked_logits(model, audio, 8 * 16000, 2 * 16000, 2, "cpu")
    assert logits.shape[1] == len(VOCAB)
    assert abs(logits.shape[0] - len(audio) / model.config.inputs_to_logits_ratio) <= 3, logits.shape


def test_the_alignment_check_counts_the_frames_of_an_adapter_the_run_adds():
    """model.add_adapter=true on a layout without one halves the CTC frames: the loader's check (and
    train --dry-run's) counts the frames of the model the run builds, not of the checkpoint or preset."""
    args = ModelArgs(preset="tiny", family="wav2vec2-bert", add_adapter=True)
    model, _ = build_model(args, VOCAB)
    check = BERT.alignment_check(BERT.run_config(args, VOCAB))
    for n in (16000, 32160, 48000):
        expected = int(model._get_feat_extract_output_lengths(torch.tensor(fbank_frames(n))))
        assert check.frames(n) == expected, n
