"""wav2vec2-conformer: wav2vec2's feature encoder, then conformer layers (two half-step feed-forward
blocks, self-attention with relative or rotary positions, a depthwise convolution module) instead of
the positional convolution and transformer layers. transformers' own forward trains it."""

from __future__ import annotations

import transformers

from .presets import PRESETS
from . import ModelFamily, register


def _conformer(size: dict, **extra) -> dict:
    return {**{k: v for k, v in size.items() if k != "do_stable_layer_norm"}, **extra}


@register
class Wav2Vec2ConformerFamily(ModelFamily):
    name = "wav2vec2-conformer"
    model_types = ("wav2vec2-conformer",)
    config_class = transformers.Wav2Vec2ConformerConfig
    ctc_class = transformers.Wav2Vec2ConformerForCTC
    base_attr = "wav2vec2_conformer"
    # wav2vec2-conformer-rel-pos-large's layout for "large"; "tiny" with a short depthwise kernel for CPUs
    presets = {"tiny": _conformer(PRESETS["tiny"], conv_depthwise_kernel_size=15, position_embeddings_type="relative"),
               "large": _conformer(PRESETS["large"], position_embeddings_type="relative")}
    attention_kernels = ("sdpa", "eager")  # no flash attention in transformers' conformer
    recompiles_per_length = True

    def positional_flops(self, config, frames: int) -> float:
        return 0.0  # positions enter in the attention (layer_flops)

    def layer_flops(self, config, frames: int) -> float:
        h, f, k = config.hidden_size, config.intermediate_size, config.conv_depthwise_kernel_size
        ffn = 2 * 2.0 * frames * 2 * h * f  # two feed-forward blocks
        attention = 2.0 * frames * 4 * h * h + 4.0 * frames * frames * h
        if config.position_embeddings_type == "relative":  # projected positions and their scores
            attention += 2.0 * (2 * frames) * h * h + 2.0 * frames * frames * h
        conv = 2.0 * frames * h * (2 * h + k + h)  # pointwise (to 2h for the GLU), depthwise, pointwise
        return ffn + attention + conv
