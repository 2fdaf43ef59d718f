"""Model FLOPs of CTC training, counted from the config, for perf/tflops and MFU. The model's family
(asr_dist.models, from ``config.model_type``) counts its positional embedding and its layers.

Multiply-adds count 2 FLOPs; a trained layer costs 3x its forward pass (forward, and backward for
inputs and weights), a frozen one 1x (its input needs no gradient: the feature encoder is first).
Only real audio counts: FLOPs spent on padding are waste, which is what MFU should expose."""

from __future__ import annotations

# dense fp16/bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0, "A6000": 155.0}


def forward_flops(config, num_samples: int, layers: float | None = None) -> tuple[float, float]:
    """(feature encoder, everything after it) forward FLOPs for one utterance of ``num_samples``, with
    ``layers`` transformer layers run (all of them by default; fewer with LayerDrop, a mean is fine)."""
    from .models import family_for

    return family_for(config).forward_flops(config, num_samples, layers)


def train_flops(config, num_samples: int, frozen_feature_encoder: bool, layers: float | None = None) -> float:
    encoder, rest = forward_flops(config, num_samples, layers)
    return encoder * (1 if frozen_feature_encoder else 3) + 3 * rest


def train_flops_per_audio_second(config, utterance_seconds: float, frozen_feature_encoder: bool,
                                 layers: float | None = None) -> float:
    n = max(400, int(utterance_seconds * 16000))
    return train_flops(config, n, frozen_feature_encoder, layers) / (n / 16000)


def peak_flops(device_name: str | None) -> float | None:
    """The device's dense fp16/bf16 peak in FLOP/s, or None when unknown (then no MFU is logged)."""
    if not device_name:
        return None
    for key, tf in PEAK_TFLOPS.items():
        if key in device_name:
            return tf * 1e12
    return None
