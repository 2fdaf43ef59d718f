"""data2vec-audio: wav2vec2's post-norm layout (layer-norm feature encoder, transformer with the norm
before the layers) with a positional embedding of several small convolutions instead of one large one."""

from __future__ import annotations

import transformers

from . import register
from .wav2vec2 import Wav2Vec2Family

_SIZES = {"tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
                       conv_dim=(48,) * 7, num_conv_pos_embedding_groups=16),
          "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}


@register
class Data2VecAudioFamily(Wav2Vec2Family):
    name = "data2vec-audio"
    model_types = ("data2vec-audio",)
    config_class = transformers.Data2VecAudioConfig
    ctc_class = transformers.Data2VecAudioForCTC
    base_attr = "data2vec_audio"
    presets = _SIZES
    fft_positional_conv = False  # five convolutions of kernel 19: FFTs would not pay

    def positional_flops(self, config, frames: int) -> float:
        h = config.hidden_size
        return (config.num_conv_pos_embeddings * 2.0 * frames * config.conv_pos_kernel_size * h * h
                / config.num_conv_pos_embedding_groups)
