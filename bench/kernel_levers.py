"""Two kernel levers at XLS-R-300M's sizes, each against the eager/direct computation in the same run.

1. feature_encoder: the conv feature encoder (7 layer-norm conv blocks, 512 channels) frozen, forward
   only (as when fine-tuning a pretrained model): eager against `model.compile`'s fused norm + GELU.
2. positional_conv: the positional convolution (1024 channels, kernel 128, 16 groups), forward and
   backward: PyTorch's conv1d (cuDNN on a GPU), the same with cuDNN's autotuning
   (`model.cudnn_benchmark`), and `model.fft_positional_conv`.
3. relative_key_bias: w2v-BERT 2.0's relative-key attention bias (16 heads of 64, distances -64..8), forward
   and backward: transformers' einsum over every pair's distance embedding against asr-dist's per-distance
   product and gather (asr_dist.models.wav2vec2_bert.relative_key_bias), at 50 frames per audio second.

Random data at several batch lengths; prints one JSON object: milliseconds for each, ratios, and the
largest difference from the baseline.

    python bench/kernel_levers.py                               # CPU: fp32, batch 4
    python bench/kernel_levers.py --batch 32 --dtype bf16       # a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from asr_dist.models import FAMILIES
from asr_dist.models.wav2vec2 import FusedLayerNormConvLayer, feature_encoder, fft_conv1d


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
    config = FAMILIES["wav2vec2"].preset_config("xlsr-300m", vocab_size=40)
    eager = feature_encoder(config).to(device, dtype).eval()
    fused = feature_encoder(config).to(device, dtype).eval()
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

    result = {"benchmark": "kernels", "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype,
              "batch": batch}
    rows, worst = [], 0.0
    t0 = time.time()
    with torch.no_grad():
        for seconds in args.seconds:
            x = torch.randn(batch, int(seconds * 16000), device=device, dtype=dtype)
            a, b = eager(x), fused(x)  # the first call at a length compiles or plans
            worst = max(worst, float((a.float() - b.float()).abs().max()))
            rows.append({"seconds": seconds, "eager_ms": round(timed(eager, x), 2), "fused_ms": round(timed(fused, x), 2)})
    e, f = sum(r["eager_ms"] for r in rows), sum(r["fused_ms"] for r in rows)
    result["feature_encoder"] = {"lengths": rows, "eager_ms": round(e / len(rows), 2), "fused_ms": round(f / len(rows), 2),
                                 "speedup": round(e / f, 3), "max_abs_difference": worst,
                                 "wall_seconds_with_compilation": round(time.time() - t0, 1)}

    # the positional convolution, forward + backward, as training runs it (50 frames per audio second)
    weight = (torch.randn(1024, 64, 128, device=device) * 0.02).to(dtype).requires_grad_()
    bias = torch.zeros(1024, device=device, dtype=dtype, requires_grad=True)
    ways = {"direct": lambda h: torch.nn.functional.conv1d(h, weight, bias, padding=64, groups=16),
            "fft": lambda h: fft_conv1d(h, weight, bias, 64, 16)}
    rows, worst = [], 0.0
    for seconds in args.seconds:
        h = torch.randn(batch, 1024, int(seconds * 50), device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, 1024, int(seconds * 50) + 1, device=device, dtype=dtype)
        row = {"seconds": seconds}
        outs = {}
        for name in ("direct", "direct_cudnn_benchmark", "fft"):
            torch.backends.cudnn.benchmark = name == "direct_cudnn_benchmark"
            fn = ways["direct" if name.startswith("direct") else name]

            def step():
                out = fn(h)
                out.backward(grad)
                return out

            outs[name] = step().detach().float()  # the first call plans (and autotunes)
            row[f"{name}_ms"] = round(timed(lambda _: step(), None), 2)
        torch.backends.cudnn.benchmark = False
        worst = max(worst, float((outs["fft"] - outs["direct"]).abs().max() / outs["direct"].abs().max()))
        rows.append(row)
    d = sum(r["direct_ms"] for r in rows)
    result["positional_conv"] = {
        "lengths": rows, **{f"{k}_ms": round(sum(r[f"{k}_ms"] for r in rows) / len(rows), 2)
                            for k in ("direct", "direct_cudnn_benchmark", "fft")},
        "speedup_fft": round(d / sum(r["fft_ms"] for r in rows), 3),
        "speedup_cudnn_benchmark": round(d / sum(r["direct_cudnn_benchmark_ms"] for r in rows), 3),
        "max_relative_difference_fft": worst}
    result["relative_key_bias"] = relative_key(args, batch, device, dtype, sync)
    print(json.dumps(result, indent=1))


def relative_key(args, batch: int, device, dtype, sync) -> dict:
    """transformers' relative-key bias against asr-dist's, forward + backward, at w2v-BERT 2.0's sizes."""
    from transformers.models.wav2vec2_bert.modeling_wav2vec2_bert import Wav2Vec2BertSelfAttention

    from asr_dist.models import wav2vec2_bert

    config = FAMILIES["wav2vec2-bert"].preset_config("600m", vocab_size=40)
    wav2vec2_bert.use_relative_key_bias()
    ways = {"transformers": wav2vec2_bert.transformers_relative_key_bias, "per_distance": wav2vec2_bert.relative_key_bias}
    module = Wav2Vec2BertSelfAttention(config).to(device, dtype)
    rows, worst = [], 0.0
    for seconds in args.seconds:
        frames = int(seconds * 50)
        q = torch.randn(batch, 16, frames, 64, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, 16, frames, frames, device=device, dtype=dtype)
        row, outs = {"seconds": seconds}, {}
        for name, fn in ways.items():
            def step():
                out = fn(module, q, q)[1]
                out.backward(grad)
                return out

            outs[name] = step().detach().float()
            sync()
            t = time.time()
            for _ in range(args.repeats):
                step()
            sync()
            row[f"{name}_ms"] = round((time.time() - t) / args.repeats * 1000, 2)
        worst = max(worst, float((outs["per_distance"] - outs["transformers"]).abs().max()))
        rows.append(row)
    t, p = (sum(r[f"{k}_ms"] for r in rows) / len(rows) for k in ways)
    return {"lengths": rows, "transformers_ms": round(t, 2), "per_distance_ms": round(p, 2), "speedup": round(t / p, 3),
            "max_abs_difference": worst}


if __name__ == "__main__":
    main()
