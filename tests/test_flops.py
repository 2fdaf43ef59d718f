"""FLOPs per audio second from the model config: XLS-R-300M costs about 123 GFLOP to train per audio
second (forward and backward with a frozen feature encoder); the count scales with length and with what is frozen."""

import transformers

from asr_dist.flops import peak_flops, train_flops_per_audio_second
from asr_dist.models.presets import PRESETS


def test_xlsr_300m_costs_about_123_gflop_per_audio_second():
    cfg = transformers.Wav2Vec2Config(**PRESETS["xlsr-300m"], vocab_size=40)
    trained = train_flops_per_audio_second(cfg, 8.0, frozen_feature_encoder=False)
    frozen = train_flops_per_audio_second(cfg, 8.0, frozen_feature_encoder=True)
    assert 105e9 < trained < 140e9, trained / 1e9
    assert frozen < trained - 5e9  # the frozen encoder runs forward only
    # attention grows with length: a 15 s utterance costs more per second than a 2 s one
    assert train_flops_per_audio_second(cfg, 15, False) > train_flops_per_audio_second(cfg, 2, False)
    # LayerDrop: the transformer layers not run are not counted; all 24 run by default
    assert train_flops_per_audio_second(cfg, 8.0, True, layers=24) == frozen
    dropped = frozen - train_flops_per_audio_second(cfg, 8.0, True, layers=12)
    assert 0.4 * frozen < dropped < 0.5 * frozen  # 12 layers of 24 hold most of the FLOPs (the rest: CNN, head)


def test_tiny_is_orders_of_magnitude_cheaper_and_peaks_are_known():
    tiny = transformers.Wav2Vec2Config(**PRESETS["tiny"], vocab_size=40)
    assert train_flops_per_audio_second(tiny, 4, False) < 3e9
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("cpu") is None and peak_flops(None) is None
