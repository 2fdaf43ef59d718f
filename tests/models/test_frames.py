"""What a family counts: the CTC frames of an utterance (as transformers' model computes them; the alignment
check the loader skips unalignable utterances with) and the training FLOPs of its layout."""

from __future__ import annotations

import torch
import transformers

from asr_dist.config import ModelArgs
from asr_dist.flops import train_flops_per_audio_second
from asr_dist.models import FAMILIES, build_model

VOCAB = {c: i for i, c in enumerate(["[PAD]", "[UNK]", "|", *"abcdefghij"])}


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
