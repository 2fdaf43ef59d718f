"""The feature encoder's forward pass, eager against `model.compile`'s fused layer norm + GELU.

XLS-R's conv feature encoder (7 layer-norm conv blocks, 512 channels) on a batch of random audio at
several lengths, frozen (forward only, as when fine-tuning a pretrained model). Baseline: the same
blocks eager, in the same run. Prints one JSON object: milliseconds per forward for each, and the ratio.

    python bench/feature_encoder.py                       # CPU: fp32, batch 4
    python bench/feature_encoder.py --batch 32 --dtype bf16   # a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

from asr_dist.model import PRESETS, FusedLayerNormConvLayer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="utterances per batch (default: 32 on a GPU, 4 on CPU)")
    ap.add_argument("--seconds", type=float, nargs="+", default=[4.5, 5.0, 6.0, 5.5], help="batch lengths")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (32 if cuda else 4)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = transformers.Wav2Vec2Config(**PRESETS["xlsr-300m"], vocab_size=40)
    eager = transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2FeatureEncoder(config).to(device, dtype).eval()
    fused = transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2FeatureEncoder(config).to(device, dtype).eval()
    fused.load_state_dict(eager.state_dict())
    for block in fused.conv_layers:
        block.__class__ = FusedLayerNormConvLayer
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(model, x) -> float:
        sync()
        t = time.time()
        for _ in range(args.repeats):
            model(x)
        sync()
        return (time.time() - t) / args.repeats * 1000

    rows, worst = [], 0.0
    t0 = time.time()
    with torch.no_grad():
        for seconds in args.seconds:
            x = torch.randn(batch, int(seconds * 16000), device=device, dtype=dtype)
            a, b = eager(x), fused(x)  # the first call at a length compiles or plans
            worst = max(worst, float((a.float() - b.float()).abs().max()))
            rows.append({"seconds": seconds, "eager_ms": round(timed(eager, x), 2), "fused_ms": round(timed(fused, x), 2)})
    e, f = sum(r["eager_ms"] for r in rows), sum(r["fused_ms"] for r in rows)
    print(json.dumps({"benchmark": "feature_encoder", "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "dtype": args.dtype, "batch": batch, "lengths": rows, "eager_ms": round(e / len(rows), 2),
                      "fused_ms": round(f / len(rows), 2), "speedup": round(e / f, 3),
                      "max_abs_difference": worst, "wall_seconds_with_compilation": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
