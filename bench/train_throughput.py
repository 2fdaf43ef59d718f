#!/usr/bin/env python3
"""Training throughput: asr-dist against a plain PyTorch loop, same model, same synthetic audio.

Audio: noise-like "speech" of log-normal durations clipped to 1.5-15 s (mean about 5.5 s), built into
a shard set; transcripts of about 12 characters per second. Model: a CTC model of one family
(``--family``: wav2vec2 by default, or any of asr_dist.models) from a preset with random weights and a
frozen feature encoder; every variant, the plain loops too, trains the same family. Every variant trains global batches of 32 utterances
(16 x 2 accumulation) and reports audio seconds per second after warm-up, step time, padding
fraction, peak GPU memory and MFU (GPU only: model FLOPs from asr_dist.flops, about 101 GFLOP per
audio second for XLS-R-300M at 5.5 s utterances, encoder frozen; peak from --peak-tflops).

Every variant runs in its own process with its own time limit (a crash or a hang costs that row, not
the run); each result is also appended to --jsonl as it comes.

  python bench/train_throughput.py                      # CPU: tiny preset, fp32, a few steps (CI keeps it working)
  python bench/train_throughput.py --preset xlsr-300m --precision fp16 --steps 20   # on a GPU
  python bench/train_throughput.py --family hubert      # another family's tiny preset, on CPU
  python bench/train_throughput.py --family wav2vec2-bert --preset 600m --precision bf16   # w2v-BERT 2.0's layout, GPU
  python bench/train_throughput.py --list               # the variants
-> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from asr_dist.data.samples import LabelEncoder, collate, input_padding  # noqa: E402
from asr_dist.data.shardset import ShardSet  # noqa: E402
from asr_dist.data.writer import BuildOptions, build  # noqa: E402
from synthetic import make_corpus  # noqa: E402

FAMILY = "wav2vec2"  # --family: the model family every variant trains
SECONDS: dict[str, float] = {}  # each utterance's audio seconds, by key (load_samples)


def batch_of(items: list, pad: int = 1) -> dict:
    """A padded micro-batch of featurised utterances (the family's input: waveform or feature frames)."""
    from asr_dist.models import FAMILIES

    return collate(items, input_padding(FAMILIES[FAMILY].featurizer(), pad), [SECONDS[k] for k, *_ in items])


def model_inputs(b: dict, device: torch.device) -> dict:
    """The family's forward keywords for batch ``b``."""
    from asr_dist.models import FAMILIES

    return {FAMILIES[FAMILY].input_name: b["input_values"].to(device), "attention_mask": b["attention_mask"].to(device),
            "labels": b["labels"].to(device)}


def make_shards(root: Path, n: int, seed: int = 0) -> str:
    manifest = make_corpus(root, n, seed)
    build(BuildOptions(inputs=[manifest], output=str(root / "shards"), shard_size=32, progress=False, max_duration=16))
    return str(root / "shards")


def flops_per_audio_second(preset: str, seconds: float = 5.5) -> float:
    """Training FLOPs of one audio second (asr_dist.flops, from the config), frozen feature encoder,
    at the corpus's mean duration."""
    from asr_dist.flops import train_flops_per_audio_second
    from asr_dist.models import FAMILIES

    return train_flops_per_audio_second(FAMILIES[FAMILY].preset_config(preset, vocab_size=40), seconds, True)


def plain_model(shards: str, preset: str, device: torch.device,
                cudnn_sdpa: bool = True) -> tuple[list, torch.nn.Module, torch.optim.Optimizer]:
    """The decoded utterances, the model (feature encoder frozen) and a plain AdamW, for the plain loops.
    ``cudnn_sdpa``: PyTorch's own choice of attention kernels (cuDNN's on Hopper), as a user of plain
    PyTorch gets; false: asr-dist's default (``model.cudnn_attention=false``)."""
    from asr_dist.config import ModelArgs
    from asr_dist.models import build_model

    samples, vocab = load_samples(shards)
    model, family = build_model(ModelArgs(preset=preset, family=FAMILY, mask_time_prob=0.0, cudnn_attention=cudnn_sdpa,
                                          freeze_feature_encoder=True), vocab)
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    return samples, model, opt


def plain_loop(shards: str, preset: str, precision: str, steps: int, warmup: int, device: torch.device,
               micro: int = 16, accumulation: int = 2, bucketed: bool = False, pad: int = 1, repeat: int = 0,
               cudnn_sdpa: bool = True) -> dict:
    """The baseline: a plain loop (AMP on GPU), random batches of 16, accumulation 2. ``bucketed``: each
    micro-batch is drawn from utterances of similar length (a pool of 32 micro-batches sorted by length).
    ``repeat`` N: cycle through the first N batches (N shapes, seen again and again), to tell the cost of
    a new batch length from the cost of the data. ``cudnn_sdpa`` false: no cuDNN attention backend."""
    samples, model, opt = plain_model(shards, preset, device, cudnn_sdpa)
    amp = device.type == "cuda" and precision in ("fp16", "bf16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(enabled=amp and precision == "fp16")
    rng = random.Random(0)
    queue: list = []

    def fresh_batch() -> list:
        if not bucketed:
            return rng.sample(samples, micro)
        if not queue:
            pool = sorted(rng.sample(samples, min(len(samples), 32 * micro)), key=lambda s: len(s[1]))
            queue.extend(pool[i:i + micro] for i in range(0, len(pool) - micro + 1, micro))
            rng.shuffle(queue)
        return queue.pop()

    next_batch = itertools.cycle([fresh_batch() for _ in range(repeat)]).__next__ if repeat else fresh_batch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    audio_s, real, total, t0, step_ms = 0.0, 0, 0, None, []
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t0 = time.time()
        if repeat and step >= warmup:  # per-step times (a sync per step) for the shape study only
            sync()
            step_ms.append(time.time())
        for _ in range(accumulation):
            b = batch_of(next_batch(), pad)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = model(**model_inputs(b, device)).loss / accumulation
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
    times = [round((b - a) * 1000, 1) for a, b in zip(step_ms, step_ms[1:] + [time.time()])]
    return {"audio_seconds_per_second": audio_s / wall, "step_seconds": wall / steps, "padding_fraction": 1 - real / total,
            **({"step_ms": times} if times else {}),
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0}


def profile(shards: str, preset: str, precision: str, device: torch.device, micro: int = 32,
            varying: bool = False, cudnn_sdpa: bool = True) -> dict:
    """Where a step's time goes: the plain model, bucketed micro-batches of ``micro`` utterances,
    torch.profiler over 3 steps after 3 of warm-up; the top kernels by GPU time and the top host-side
    ops by their own CPU time. ``varying``: a new batch (of a new length) every step, as in training;
    otherwise the same middle-length batch every step. Also the wall time of 5 unprofiled steps."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    samples, model, opt = plain_model(shards, preset, device, cudnn_sdpa)
    samples.sort(key=lambda s: len(s[1]))
    groups = [samples[i:i + micro] for i in range(0, len(samples) - micro + 1, micro)]
    random.Random(0).shuffle(groups)
    middle = len(samples) // 2
    fixed = batch_of(samples[middle - micro // 2: middle - micro // 2 + micro])
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    amp = device.type == "cuda" and precision != "fp32"
    audio, made = [], [0]

    def step():
        made[0] += 1
        b = batch_of(groups[made[0] % len(groups)]) if varying else fixed  # 11 steps: new lengths from 352 utterances
        audio.append(float(b["durations"].sum()))
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = model(**model_inputs(b, device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t, audio = time.time(), []
    for _ in range(5):
        step()
    sync()
    wall_ms, timed_audio, audio = (time.time() - t) / 5 * 1000, sum(audio), []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    averages = prof.key_averages()

    def top(kind: str, key: str, n: int = 25) -> tuple[float, list]:
        events = [e for e in averages if e.device_type.name == kind]
        total = sum(getattr(e, key) for e in events) or 1.0
        best = sorted(events, key=lambda e: -getattr(e, key))[:n]
        return total, [{"name": e.key[:90], "ms_per_step": round(getattr(e, key) / 3 / 1000, 2),
                        "share": round(getattr(e, key) / total, 3), "calls_per_step": e.count // 3} for e in best]

    device_total, kernels = top("CUDA" if device.type == "cuda" else "CPU",
                                "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total")
    host_total, host = top("CPU", "self_cpu_time_total", 15)
    return {"varying_shapes": varying, "audio_seconds_per_step": round(timed_audio / 5, 1),
            "wall_ms_per_step": round(wall_ms, 2), "audio_seconds_per_second": timed_audio / wall_ms * 1000 / 5,
            "gpu_ms_per_step": round(device_total / 3 / 1000, 2), "host_ms_per_step": round(host_total / 3 / 1000, 2),
            "top": kernels, "top_host": host}


def load_samples(shards: str) -> tuple[list, dict]:
    from asr_dist.data import index as fmt

    from asr_dist.models import FAMILIES

    s = ShardSet.open(shards)
    enc = LabelEncoder(s.vocab)
    featurize = FAMILIES[FAMILY].featurizer()
    samples = []
    for shard in s.shards:
        for key, files in fmt.iter_shard(shard.path):
            audio, _ = sf.read(io.BytesIO(files["flac"]), dtype="float32")
            text = json.loads(files["json"])["text"]
            samples.append((key, featurize(audio), enc(text), text))
            SECONDS[key] = len(audio) / 16000
    return samples, s.vocab


def hf_trainer(shards: str, preset: str, precision: str, steps: int, warmup: int, device: torch.device,
               out: Path) -> dict:
    """The other baseline: the transformers Trainer recipe of the Hugging Face speech example (per-device
    batch 16, accumulation 2, AdamW, fp16/bf16 AMP on a GPU; random batches, no length grouping)."""
    import transformers

    from asr_dist.config import ModelArgs
    from asr_dist.models import build_model

    samples, vocab = load_samples(shards)
    model, _ = build_model(ModelArgs(preset=preset, family=FAMILY, mask_time_prob=0.0, cudnn_attention=True,
                                     freeze_feature_encoder=True), vocab)  # torch's choice of attention kernels
    clock = {"audio": 0.0, "batches": 0, "counting": False, "t0": None, "t1": None}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i]

    def collator(items):
        b = batch_of(items)
        if clock["counting"]:
            clock["audio"] += float(b["durations"].sum())
            clock["batches"] += 1
        return model_inputs(b, torch.device("cpu"))

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


SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "xlsr300m-danish.yaml"


def asr_dist_run(shards: str, preset: str, precision: str, zero: int, steps: int, warmup: int, out: Path,
                 extra: list[str], workers: int = 2, shipped: bool = False) -> dict:
    """asr-dist's engine (DeepSpeed, bucketing loader), throughput from its own metrics.jsonl. ``shipped``:
    configs/xlsr300m-danish.yaml as it is (its batches, precision, packing, SpecAugment), on the synthetic
    shards and a random model of ``preset``."""
    from asr_dist.config import load_config
    from asr_dist.engine import train
    from asr_dist.models import FAMILIES

    run = [f"output_dir={out}", f"data.train_shards=[{shards}]", f"model.preset={preset}", f"model.family={FAMILY}",
           *(["model.freeze_feature_encoder=true"] if FAMILIES[FAMILY].has_front_end else []),
           f"train.max_steps={warmup + steps}", f"train.log_every={max(1, warmup)}",  # windows that start after the warmup
           "train.checkpoint_every=0", "eval.every_steps=0", "train.resume=never", f"data.num_workers={workers}",
           "train.save_final=false"]  # a checkpoint and an export of XLS-R-300M would cost seconds of each variant's limit
    if shipped:
        cfg = load_config(str(SHIPPED), [*run, "model.pretrained=null", "data.eval_shards={}", "train.num_epochs=null",
                                         *extra])
    else:
        cfg = load_config(None, [*run, "model.mask_time_prob=0.0", f"distributed.precision={precision}",
                                 f"distributed.zero_stage={zero}", "data.micro_batch_size=16", "data.global_batch_size=32",
                                 *extra])
    train(cfg)
    shapes = epoch_shapes(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/audio_seconds_per_second" in r and r["step"] > warmup]
    # the median window: a one-off (a recompilation for a new kind of batch) does not decide the figure
    # train.profile_steps: the engine's own table of the top kernels (or CPU ops) of those steps
    top = [line.rstrip() for f in sorted((out / "profile").glob("rank0-*-top.txt")) for line in f.read_text().splitlines()[:40]]
    return {"audio_seconds_per_second": float(np.median([r["perf/audio_seconds_per_second"] for r in rows])),
            "micro_batch_size": cfg.data.micro_batch_size, "precision": cfg.distributed.precision,
            **({"micro_batch_seconds": cfg.data.micro_batch_seconds} if cfg.data.micro_batch_seconds else {}),
            **({"profile_top": top} if top else {}),
            "windows": [round(r["perf/audio_seconds_per_second"], 1) for r in rows],
            "data_wait_fraction": float(np.median([r["perf/data_wait_fraction"] for r in rows])),
            "peak_gpu_memory_gb": max((r.get("perf/gpu_memory_gb", 0.0) for r in rows), default=0.0), **shapes}


def epoch_shapes(cfg) -> dict:
    """The shapes of one epoch's micro-batches as the run's loader forms them (its plan: lengths, no audio):
    how many distinct input shapes, and the share of input samples that hold no audio (padding, and between
    packed utterances the gaps to the frame grid and the rest of the capacity)."""
    from asr_dist.data.packing import capacity_for, packed_length
    from asr_dist.plan import plan_run

    # the run's own plan: on a GPU (flex attention is refused without one); train() has made its auto values concrete
    plan = plan_run(cfg, 1, cuda=torch.cuda.is_available())
    loader = plan.loader(0)
    loader.set_epoch(0)
    pad = max(1, cfg.data.pad_to_multiple_of)
    sizes, shapes, audio = [], set(), 0
    for b in loader.plan():
        n = b["num_samples"]
        audio += sum(n)
        if plan.pack_align is not None:
            shape = capacity_for(packed_length(n, plan.pack_align), loader.capacities)
            size = shape
        else:
            shape = (len(n), -(-max(n) // pad) * pad)  # (utterances, longest padded)
            size = shape[0] * shape[1]
        shapes.add(shape)
        sizes.append(size)
    out = {"shapes_per_epoch": len(shapes), "padding_fraction": round(1 - audio / sum(sizes), 4)}
    if plan.pack_align is not None:
        out["capacities_seconds"] = [round(c / 16000, 2) for c in loader.capacities]
    return out


def run_variant(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one variant's process, run in a process group of its own: at its limit, or
    when this process is interrupted (gpu-check.sh's limit for the part), the whole group gets SIGINT and, 10 s
    later, SIGKILL, so that no loader worker or compile worker lives on into the next variant, and none holds the
    output pipes open."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    return proc.returncode, stdout, stderr


def variants(args, cuda: bool) -> dict:
    """name -> (kind, keyword arguments). The seed recipe is 32 utterances per optimizer step."""
    p, fast = args.precision, ("bf16" if cuda else args.precision)
    v = {"baseline_plain_loop": ("plain", {"precision": p}),
         "baseline_hf_trainer": ("trainer", {"precision": p})}
    # configs/xlsr300m-danish.yaml as shipped: its precision (auto), packing, micro-batch size (auto: probed on
    # a GPU), SpecAugment and ZeRO stage
    v["asr_dist_shipped"] = ("asr_dist", {"precision": None, "zero": None, "extra": [], "shipped": True})
    for z in args.zero:  # the recipe as a user would first write it: fp16, 16 x 2
        v[f"asr_dist_zero{z}"] = ("asr_dist", {"precision": p, "zero": z, "extra": []})
    # the seed recipe tuned: one micro-batch of 32 bucketed utterances, bf16 on a GPU (no loss-scale checks)
    tuned = ["data.micro_batch_size=32", "data.global_batch_size=32"]
    v["asr_dist_seed_fast"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": tuned})
    v["asr_dist_seed_fast_compiled"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*tuned, "model.compile=true"]})
    # transformers' own forward, which waits for the GPU up to 9 times per micro-batch (model.sync_free_forward=false)
    v["asr_dist_seed_fast_hf_forward"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                       "extra": [*tuned, "model.sync_free_forward=false"]})
    # with SpecAugment, as training runs (mask_time_prob 0.05; the variants above train without it, like the
    # baselines): transformers' forward then also waits for its mask's lengths, copy and boolean index
    spec = "model.mask_time_prob=0.05"
    v["asr_dist_seed_fast_specaug"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*tuned, spec]})
    v["asr_dist_seed_fast_specaug_hf_forward"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [
        *tuned, spec, "model.sync_free_forward=false"]})
    # DeepSpeed's throughput timer on (its default; asr-dist turns it off): a device synchronise per micro-batch
    timer = f"distributed.deepspeed_config={Path(__file__).parent / 'deepspeed_throughput_timer.json'}"
    v["asr_dist_seed_fast_ds_timer"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*tuned, timer]})
    for z in args.zero:
        v[f"asr_dist_zero{z}_ds_timer"] = ("asr_dist", {"precision": p, "zero": z, "extra": [timer]})
        v[f"asr_dist_zero{z}_hf_forward"] = ("asr_dist", {"precision": p, "zero": z, "extra": ["model.sync_free_forward=false"]})
    v["plain_loop_bucketed_32x1"] = ("plain", {"precision": fast, "micro": 32, "accumulation": 1, "bucketed": True})
    # lengths padded to whole seconds: a few distinct shapes (cuDNN builds plans per new shape)
    sec = "data.pad_to_multiple_of=16000"
    v["plain_loop_bucketed_32x1_pad1s"] = ("plain", {"precision": fast, "micro": 32, "accumulation": 1, "bucketed": True,
                                                     "pad": 16000})
    # the shape study: the same 4 batches again and again; the profile over new batches; no cuDNN attention;
    # the allocator's expandable segments (set in the variant's environment)
    v["plain_loop_bucketed_32x1_repeat4"] = ("plain", {"precision": fast, "micro": 32, "accumulation": 1,
                                                       "bucketed": True, "repeat": 4})
    v["plain_loop_bucketed_32x1_no_cudnn_sdpa"] = ("plain", {"precision": fast, "micro": 32, "accumulation": 1,
                                                             "bucketed": True, "cudnn_sdpa": False})
    v["plain_loop_bucketed_32x1_expandable"] = ("plain", {"precision": fast, "micro": 32, "accumulation": 1,
                                                          "bucketed": True,
                                                          "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}})
    v["plain_loop_bucketed_32x1_repeat4_no_cudnn_sdpa"] = ("plain", {"precision": fast, "micro": 32, "accumulation": 1,
                                                                     "bucketed": True, "repeat": 4, "cudnn_sdpa": False})
    v["profile_varying"] = ("profile", {"precision": fast, "varying": True})
    v["profile_varying_no_cudnn_sdpa"] = ("profile", {"precision": fast, "varying": True, "cudnn_sdpa": False})
    v["asr_dist_seed_fast_pad1s"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*tuned, sec]})
    # asr-dist leaves cuDNN's attention out by default; with it, as PyTorch would choose on Hopper
    v["asr_dist_seed_fast_cudnn_attention"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                            "extra": [*tuned, "model.cudnn_attention=true"]})
    v["asr_dist_seed_fast_pad1s_cudnn_attention"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                                  "extra": [*tuned, sec, "model.cudnn_attention=true"]})
    v["asr_dist_seed_fast_compiled_pad1s"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                           "extra": [*tuned, sec, "model.compile=true"]})
    # where asr-dist's step goes (DeepSpeed's step included): its own profiler over 3 steps after the warm-up
    v["asr_dist_seed_fast_profiled"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [
        *tuned, f"train.profile_steps=[{args.warmup + 1},{args.warmup + 3}]"]})
    # a long run meets each padded length once and then again and again: its steady state, after a warm-up
    # long enough to have met nearly every length (whole seconds: at most 15 shapes)
    v["plain_loop_bucketed_32x1_pad1s_long"] = ("plain", {"precision": fast, "micro": 32, "accumulation": 1,
                                                          "bucketed": True, "pad": 16000, "warmup": 60})
    v["asr_dist_seed_fast_pad1s_long"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*tuned, sec],
                                                       "warmup": 60})
    # the same steady state with the kernel levers that pay once per shape (compilation, cuDNN's autotuning)
    v["asr_dist_seed_fast_pad1s_long_compiled"] = ("asr_dist", {"precision": fast, "zero": 1, "warmup": 60,
                                                                "extra": [*tuned, sec, "model.compile=true"]})
    v["asr_dist_seed_fast_pad1s_long_fft_conv"] = ("asr_dist", {"precision": fast, "zero": 1, "warmup": 60,
                                                                "extra": [*tuned, sec, "model.fft_positional_conv=true"]})
    v["asr_dist_seed_fast_fft_conv"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                     "extra": [*tuned, "model.fft_positional_conv=true"]})
    v["asr_dist_seed_fast_pad1s_long_cudnn_benchmark"] = ("asr_dist", {"precision": fast, "zero": 1, "warmup": 60,
                                                                       "extra": [*tuned, sec, "model.cudnn_benchmark=true"]})
    # packed micro-batches (data.pack): no padding in the layers, a handful of shapes (its capacities)
    pack = "data.pack=true"
    v["asr_dist_seed_fast_packed"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*tuned, pack]})
    v["asr_dist_seed_fast_packed_compiled"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                            "extra": [*tuned, pack, "model.compile=true"]})
    v["asr_dist_seed_fast_packed_flex"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                        "extra": [*tuned, pack, "model.attention=flex_attention"]})
    v["asr_dist_zero1_packed"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [pack]})  # the seed's batch
    # (the names below say no precision: they run in bf16 on a GPU and in --precision on CPU)
    if args.large_micro:
        large = [f"data.micro_batch_size={args.large_micro}", f"data.global_batch_size={2 * args.large_micro}",
                 "data.bucket_batches=8"]
        v["asr_dist_large_batch"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": large})
        v["asr_dist_large_batch_compiled"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                           "extra": [*large, "model.compile=true"]})
        v["asr_dist_large_batch_pad1s"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*large, sec]})
    if args.large_seconds:  # the large-batch mode proper: micro-batches filled to a number of seconds of audio
        filled = [f"data.micro_batch_seconds={args.large_seconds:g}", f"data.global_batch_seconds={2 * args.large_seconds:g}",
                  "data.bucket_batches=8"]
        v["asr_dist_large_seconds"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": filled})
        v["asr_dist_large_seconds_pad1s"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*filled, sec]})
        v["asr_dist_large_seconds_packed"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [*filled, pack]})
        # the same global batch, its micro-batch seconds chosen by the start-up memory probe (on CPU: as many as
        # 16 of the longest utterances)
        v["asr_dist_large_seconds_packed_auto"] = ("asr_dist", {"precision": fast, "zero": 1, "extra": [
            *filled, pack, "data.micro_batch_seconds=auto"]})
        v["asr_dist_large_seconds_packed_compiled"] = ("asr_dist", {"precision": fast, "zero": 1,
                                                                    "extra": [*filled, pack, "model.compile=true"]})
    v["profile_seed_fast"] = ("profile", {"precision": fast})  # by default on a GPU only
    return v


def run_one(args, name: str, kind: str, kw: dict, shards: str, tmp: Path) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    kw = {k: v for k, v in kw.items() if k != "env"}  # the parent set it
    warmup = kw.pop("warmup", args.warmup)  # a variant may warm up longer than --warmup
    if kind == "plain":
        return plain_loop(shards, args.preset, steps=args.steps, warmup=warmup, device=device, **kw)
    if kind == "trainer":
        return hf_trainer(shards, args.preset, kw["precision"], args.steps, args.warmup, device, tmp / name)
    if kind == "profile":
        return profile(shards, args.preset, device=device, **kw)
    return asr_dist_run(shards, args.preset, kw["precision"], kw["zero"], args.steps, warmup, tmp / name,
                        kw["extra"], workers=args.workers, shipped=kw.get("shipped", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--family", default="wav2vec2", help="the model family (asr_dist.models.FAMILIES)")
    ap.add_argument("--precision", default=None, help="default: fp16 on a GPU, fp32 on CPU")
    ap.add_argument("--utterances", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="measured optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--zero", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workers", type=int, default=None, help="loader workers per rank (default: 4 on a GPU, 2 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense fp16/bf16 peak")
    ap.add_argument("--large-micro", type=int, default=64,
                    help="large-batch mode: utterances per micro-batch (of similar length: bucketed), global batch "
                         "2x this; 0 skips it (default: 64, about 350 s of audio a micro-batch)")
    ap.add_argument("--large-seconds", type=float, default=None,
                    help="large-batch mode proper (data.micro_batch_seconds): micro-batches of as many similar-length "
                         "utterances as fit in this many seconds, padding included, global batch 2x; 0 skips it "
                         "(default: 600 on a GPU, 60 on CPU)")
    ap.add_argument("--only", nargs="+", default=None, help="run these variants only (see --list)")
    ap.add_argument("--skip", nargs="+", default=[], help="leave these variants out")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one variant may take (it is stopped after)")
    ap.add_argument("--jsonl", default=None, help="also append each variant's result here as it finishes")
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global FAMILY
    FAMILY = args.family
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    args.precision = args.precision or ("fp16" if cuda else "fp32")
    args.workers = args.workers or (4 if cuda else 2)
    args.large_seconds = (600 if cuda else 60) if args.large_seconds is None else args.large_seconds
    table = variants(args, cuda)
    if args.list:
        print("\n".join(f"{n}: {k} {kw}" for n, (k, kw) in table.items()))
        return
    if args.run_one:  # a child: one variant, one JSON line
        kind, kw = table[args.run_one]
        with tempfile.TemporaryDirectory() as tmp:
            result = run_one(args, args.run_one, kind, kw, args.shards, Path(tmp))
        print("RESULT " + json.dumps(result))
        return
    unknown = set(args.only or []) - set(table)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; --list shows them")
    names = [n for n in (args.only or [n for n in table if cuda or table[n][0] != "profile"]) if n not in args.skip]
    result = {"benchmark": "train_throughput", "family": args.family, "preset": args.preset, "precision": args.precision, "device":
              torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "loader_workers": args.workers}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "data", args.utterances)
        for name in names:
            cmd = [sys.executable, __file__, "--run-one", name, "--shards", shards]
            for flag in ("preset", "family", "precision", "utterances", "steps", "warmup", "workers", "large_micro", "large_seconds"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            cmd += ["--zero", *map(str, args.zero)]
            t = time.time()
            try:
                env = {**os.environ, **table[name][1].get("env", {})}
                code, stdout, stderr = run_variant(cmd, env, args.timeout)
                lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if code == 0 and lines else \
                    {"error": f"exit {code}: " + stderr.strip()[-1500:]}
            except subprocess.TimeoutExpired:
                row = {"error": f"stopped after {args.timeout:.0f} s"}
            row["wall_seconds"] = round(time.time() - t, 1)
            found[name] = row
            print(f"{name}: {json.dumps(row)[:300]}", file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps({"variant": name, "device": result["device"], **row}) + "\n")
    base = found.get("baseline_plain_loop", {}).get("audio_seconds_per_second")
    trainer_base = found.get("baseline_hf_trainer", {}).get("audio_seconds_per_second")
    for v in found.values():
        if "audio_seconds_per_second" not in v:
            continue
        if base:
            v["ratio_vs_plain_loop"] = round(v["audio_seconds_per_second"] / base, 3)
        if trainer_base:
            v["ratio_vs_hf_trainer"] = round(v["audio_seconds_per_second"] / trainer_base, 3)
        if cuda:
            v["mfu"] = round(v["audio_seconds_per_second"] * flops_per_audio_second(args.preset) / (args.peak_tflops * 1e12), 4)
        v["audio_seconds_per_second"] = round(v["audio_seconds_per_second"], 2)
    result["variants"] = found
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
