"""HuBERT: wav2vec2's layout (feature encoder, projection, positional convolution, transformer) with
its own pretraining targets; the wav2vec2 family's forward, kernels and FLOPs hold as they are."""

from __future__ import annotations

import transformers

from .presets import PRESETS
from . import register
from .wav2vec2 import Wav2Vec2Family


@register
class HubertFamily(Wav2Vec2Family):
    name = "hubert"
    model_types = ("hubert",)
    config_class = transformers.HubertConfig
    ctc_class = transformers.HubertForCTC
    base_attr = "hubert"
    time_masks_over_padding = True  # HubertModel draws SpecAugment's time masks without the padding mask
    presets = {"tiny": PRESETS["tiny"], "base": PRESETS["base"], "large": PRESETS["large"]}  # hubert-{base,large}-ll60k
