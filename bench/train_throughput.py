#!/usr/bin/env python3
"""Training throughput: asr-dist against a plain PyTorch loop, same model, same synthetic audio.

Audio: noise-like "speech" of log-normal durations clipped to 1.5-15 s (mean about 5.5 s), built into
a shard set; transcripts of about 12 characters per second. Model: Wav2Vec2ForCTC from a preset with
random weights and a frozen feature encoder. Every variant trains global batches of 32 utterances
(16 x 2 accumulation) and reports audio seconds per second after warm-up, step time, padding
fraction, peak GPU memory and MFU (GPU only: model FLOPs from asr_dist.flops, about 101 GFLOP per
audio second for XLS-R-300M at 5.5 s utterances, encoder frozen; peak from --peak-tflops).

  python bench/train_throughput.py                      # CPU: tiny preset, fp32, a few steps (CI keeps it working)
  python bench/train_throughput.py --preset xlsr-300m --precision fp16 --steps 20   # on a GPU
-> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from asr_dist.data.loader import LabelEncoder, ShardSet, collate, normalize  # noqa: E402
from asr_dist.data.writer import BuildOptions, build  # noqa: E402
from synthetic import make_corpus  # noqa: E402

def make_shards(root: Path, n: int, seed: int = 0) -> str:
    manifest = make_corpus(root, n, seed)
    build(BuildOptions(inputs=[manifest], output=str(root / "shards"), shard_size=32, progress=False, max_duration=16))
    return str(root / "shards")


def flops_per_audio_second(preset: str, seconds: float = 5.5) -> float:
    """Training FLOPs of one audio second (asr_dist.flops, from the config), frozen feature encoder,
    at the corpus's mean duration."""
    import transformers

    from asr_dist.flops import train_flops_per_audio_second
    from asr_dist.model import PRESETS

    return train_flops_per_audio_second(transformers.Wav2Vec2Config(**PRESETS[preset], vocab_size=40), seconds, True)


def plain_loop(shards: str, preset: str, precision: str, steps: int, warmup: int, device: torch.device) -> dict:
    """The baseline: a plain loop (AMP on GPU), random batches of 16, accumulation 2."""
    from asr_dist.config import ModelArgs
    from asr_dist.model import build_model

    samples, vocab = load_samples(shards)
    model = build_model(ModelArgs(preset=preset, mask_time_prob=0.0), vocab).to(device).train()
    model.freeze_feature_encoder()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = device.type == "cuda" and precision in ("fp16", "bf16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(enabled=amp and precision == "fp16")
    rng = random.Random(0)
    audio_s, real, total, t0 = 0.0, 0, 0, None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
        for _ in range(2):
            b = collate(rng.sample(samples, 16))
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = model(input_values=b["input_values"].to(device), attention_mask=b["attention_mask"].to(device),
                             labels=b["labels"].to(device)).loss / 2
            scaler.scale(loss).backward()
            if step >= warmup:
                audio_s += float(b["durations"].sum())
                real += int(b["attention_mask"].sum())
                total += b["attention_mask"].numel()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.time() - t0
    return {"audio_seconds_per_second": audio_s / wall, "step_seconds": wall / steps, "padding_fraction": 1 - real / total}


def load_samples(shards: str) -> tuple[list, dict]:
    from asr_dist.data import index as fmt

    s = ShardSet.open(shards)
    enc = LabelEncoder(s.vocab)
    samples = []
    for shard in s.shards:
        for key, files in fmt.iter_shard(shard.path):
            audio, _ = sf.read(io.BytesIO(files["flac"]), dtype="float32")
            text = json.loads(files["json"])["text"]
            samples.append((key, normalize(audio), enc(text), text))
    return samples, s.vocab


def hf_trainer(shards: str, preset: str, precision: str, steps: int, warmup: int, device: torch.device,
               out: Path) -> dict:
    """The other baseline: the transformers Trainer recipe of the Hugging Face speech example (per-device
    batch 16, accumulation 2, AdamW, fp16/bf16 AMP on a GPU; random batches, no length grouping)."""
    import transformers

    from asr_dist.config import ModelArgs
    from asr_dist.model import build_model

    samples, vocab = load_samples(shards)
    model = build_model(ModelArgs(preset=preset, mask_time_prob=0.0), vocab)
    model.freeze_feature_encoder()
    clock = {"audio": 0.0, "batches": 0, "counting": False, "t0": None, "t1": None}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i]

    def collator(items):
        b = collate(items)
        if clock["counting"]:
            clock["audio"] += float(b["durations"].sum())
            clock["batches"] += 1
        return {"input_values": b["input_values"], "attention_mask": b["attention_mask"], "labels": b["labels"]}

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            if state.global_step == warmup:
                clock.update(t0=time.time(), counting=True, audio=0.0, batches=0)
            if state.global_step == warmup + steps:
                clock["t1"] = time.time()

    targs = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=16, gradient_accumulation_steps=2, learning_rate=1e-4,
        max_steps=warmup + steps, fp16=device.type == "cuda" and precision == "fp16",
        bf16=device.type == "cuda" and precision == "bf16", use_cpu=device.type != "cuda", report_to=[],
        save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Data(), data_collator=collator,
                                   callbacks=[Clock()])
    trainer.train()
    # the data loader may run a batch ahead of the step clock: count the mean audio of the batches it made
    wall = clock["t1"] - clock["t0"]
    per_batch = clock["audio"] / max(1, clock["batches"])
    return {"audio_seconds_per_second": per_batch * 2 * steps / wall, "step_seconds": wall / steps}


def asr_dist_run(shards: str, preset: str, precision: str, zero: int, steps: int, warmup: int, out: Path,
                 extra: list[str]) -> dict:
    """asr-dist's engine (DeepSpeed, bucketing loader), throughput from its own metrics.jsonl."""
    from asr_dist.config import load_config
    from asr_dist.engine import train

    cfg = load_config(None, [f"output_dir={out}", f"data.train_shards=[{shards}]", f"model.preset={preset}",
                             "model.freeze_feature_encoder=true", "model.mask_time_prob=0.0",
                             f"train.max_steps={warmup + steps}", f"train.log_every={warmup}" if warmup else "train.log_every=1",
                             "train.checkpoint_every=0", "eval.every_steps=0", "train.resume=never",
                             f"distributed.precision={precision}", f"distributed.zero_stage={zero}",
                             "data.micro_batch_size=16", "data.global_batch_size=32", "data.num_workers=2",
                             f"optim.torch_adam={'true' if precision == 'fp32' else 'false'}", *extra])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/audio_seconds_per_second" in r and r["step"] > warmup]
    return {"audio_seconds_per_second": float(np.mean([r["perf/audio_seconds_per_second"] for r in rows])),
            "data_wait_fraction": float(np.mean([r["perf/data_wait_fraction"] for r in rows])),
            "peak_gpu_memory_gb": max((r.get("perf/gpu_memory_gb", 0.0) for r in rows), default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--precision", default=None, help="default: fp16 on a GPU, fp32 on CPU")
    ap.add_argument("--utterances", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="measured optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--zero", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense fp16/bf16 peak")
    ap.add_argument("--large-micro", type=int, default=64,
                    help="large-batch mode: utterances per micro-batch (of similar length: bucketed), global batch "
                         "2x this; 0 skips it (default: 64, about 350 s of audio a micro-batch)")
    ap.add_argument("--no-trainer", action="store_true", help="skip the transformers Trainer baseline")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    precision = args.precision or ("fp16" if cuda else "fp32")
    device = torch.device("cuda" if cuda else "cpu")
    result = {"benchmark": "train_throughput", "preset": args.preset, "precision": precision, "device":
              torch.cuda.get_device_name() if cuda else "cpu", "global_batch": 32, "micro_batch": 16}
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "data", args.utterances)
        variants = {"baseline_plain_loop": plain_loop(shards, args.preset, precision, args.steps, args.warmup, device)}
        if not args.no_trainer:
            variants["baseline_hf_trainer"] = hf_trainer(shards, args.preset, precision, args.steps, args.warmup,
                                                         device, Path(tmp) / "trainer")
        for z in args.zero:
            variants[f"asr_dist_zero{z}"] = asr_dist_run(shards, args.preset, precision, z, args.steps, args.warmup,
                                                         Path(tmp) / f"run{z}", [])
        if args.large_micro:
            large = "bf16" if cuda else precision
            variants[f"asr_dist_large_batch_{large}"] = asr_dist_run(
                shards, args.preset, large, min(args.zero), args.steps, args.warmup, Path(tmp) / "large",
                [f"data.micro_batch_size={args.large_micro}", f"data.global_batch_size={2 * args.large_micro}",
                 "data.bucket_batches=8"])
    base = variants["baseline_plain_loop"]["audio_seconds_per_second"]
    trainer_base = variants.get("baseline_hf_trainer", {}).get("audio_seconds_per_second")
    for v in variants.values():
        v["ratio_vs_plain_loop"] = round(v["audio_seconds_per_second"] / base, 3)
        if trainer_base:
            v["ratio_vs_hf_trainer"] = round(v["audio_seconds_per_second"] / trainer_base, 3)
        if cuda:
            v["mfu"] = round(v["audio_seconds_per_second"] * flops_per_audio_second(args.preset) / (args.peak_tflops * 1e12), 4)
        v["audio_seconds_per_second"] = round(v["audio_seconds_per_second"], 2)
    result["variants"] = variants
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
