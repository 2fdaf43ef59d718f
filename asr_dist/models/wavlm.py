"""WavLM: wav2vec2's layout with gated relative position bias in every attention layer. transformers
implements that attention eagerly only (no SDPA, no flash attention), and its own forward only: the
bias is computed in the first layer and handed on, which the sync-free forward does not do."""

from __future__ import annotations

import transformers

from .presets import PRESETS
from . import ModelFamily, register
from .wav2vec2 import use_fft_positional_conv


@register
class WavLMFamily(ModelFamily):
    name = "wavlm"
    model_types = ("wavlm",)
    config_class = transformers.WavLMConfig
    ctc_class = transformers.WavLMForCTC
    base_attr = "wavlm"
    presets = {"tiny": PRESETS["tiny"], "base": PRESETS["base"], "large": PRESETS["large"]}  # wavlm-{base,large}
    attention_kernels = ("eager",)
    fft_positional_conv = True

    def use_fft_positional_conv(self, model) -> None:
        use_fft_positional_conv(self.base(model).encoder.pos_conv_embed.conv)

    def layer_flops(self, config, frames: int) -> float:
        # plus the gate of the relative position bias: a (head size x 8) projection per head and frame
        h = config.hidden_size
        return super().layer_flops(config, frames) + 2.0 * frames * h * 8
