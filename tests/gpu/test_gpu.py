"""GPU checks (skipped without CUDA): fp16 with dynamic loss scaling on the XLS-R-300M preset for a
few hundred steps, bf16, and ZeRO-3 export consolidation. Run on a GPU machine with
`python -m pytest -q tests/gpu`, or through `bench/gpu-check.sh`, which says how to bring the packages
onto a GPU machine that has no package registry."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainkit import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def shards_of(root: Path, **durations) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic import make_corpus

    from asr_dist.data.writer import BuildOptions, build

    build(BuildOptions(inputs=[make_corpus(root / "corpus", 512, **durations)], output=str(root / "shards"),
                       shard_size=32, progress=False, max_duration=16))
    return root / "shards"


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    return shards_of(tmp_path_factory.mktemp("gpu"))


@pytest.fixture(scope="module")
def short_shards(tmp_path_factory):
    """1-4 s utterances: the loss scale's dynamics in a few hundred steps, without a training run's minutes."""
    return shards_of(tmp_path_factory.mktemp("gpu-short"), median=2.0, low=1.0, high=4.0)


def train(shards: Path, out: Path, *overrides: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "test.yaml"),
                        f"output_dir={out}", f"data.train_shards=[{shards}]", "data.eval_shards={}",
                        "data.global_batch_size=32", "data.micro_batch_size=16", "data.num_workers=4",
                        "eval.every_steps=0", "train.checkpoint_every=0", "train.log_every=10", "optim.torch_adam=true",
                        *overrides], env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fp16_xlsr_300m_loss_scale_settles(short_shards, tmp_path):
    rows = train(short_shards, tmp_path / "fp16", "model.preset=xlsr-300m", "distributed.precision=fp16",
                 "train.max_steps=200", "optim.lr=1e-4", "optim.warmup_steps=50", "distributed.zero_stage=2",
                 "train.save_final=false")  # XLS-R-300M's checkpoint and export: seconds the check has no use for
    logged = [r for r in rows if "train/loss" in r]
    assert logged and all(math.isfinite(r["train/loss"]) for r in logged)
    scales = [r["train/loss_scale"] for r in logged]
    assert scales[-1] >= 2 ** 8 and scales[-1] == scales[-2], scales  # settled, not collapsing
    assert logged[-1]["train/skipped_steps"] <= 20
    assert logged[-1]["perf/mfu"] > 0


def test_bf16_trains(synthetic_shards, tmp_path):
    rows = train(synthetic_shards, tmp_path / "bf16", "model.preset=base", "distributed.precision=bf16",
                 "train.max_steps=30", "train.save_final=false")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_zero3_export_is_the_full_model(synthetic_shards, tmp_path):
    import transformers

    train(synthetic_shards, tmp_path / "z3", "model.preset=base", "distributed.precision=bf16",
          "distributed.zero_stage=3", "train.max_steps=5")
    model = transformers.Wav2Vec2ForCTC.from_pretrained(str(tmp_path / "z3" / "model"))
    assert sum(p.numel() for p in model.parameters()) > 90_000_000
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("weight"))


def test_auto_micro_batch_takes_the_largest_that_fits(synthetic_shards, tmp_path):
    """data.micro_batch_size=auto: the probe measures the longest micro-batch of each size on this GPU (packed,
    bf16), takes the largest under the budget, and a budget with less room takes a smaller one; a run with
    auto records its choice and trains. The tiny preset: packing refuses the base preset's group-norm feature
    encoder."""
    from asr_dist import memory
    from asr_dist.config import load_config
    from asr_dist.models import build_model
    from asr_dist.plan import plan_run
    from asr_dist.step import StepSpec, forward

    cfg = load_config(str(REPO / "configs" / "test.yaml"), [
        f"output_dir={tmp_path / 'probe'}", f"data.train_shards=[{synthetic_shards}]", "data.eval_shards={}",
        "data.global_batch_size=32", "data.micro_batch_size=auto", "data.pack=true", "model.preset=tiny",
        "distributed.precision=bf16", "train.max_steps=2"])
    plan = plan_run(cfg, 1, cuda=True)
    assert plan.micro_candidates == [32, 16, 8, 4, 2, 1]
    model, family = build_model(cfg.model, plan.vocab, family=plan.family, config=plan.model_config)
    assert family.use_sync_free_forward(model)
    device = torch.device("cuda")
    spec = StepSpec(input_name=family.input_name, device=device, input_dtype=torch.bfloat16, sync_free=True)

    def fwd(m, batch):
        return forward(m, batch, spec)

    with memory.on_device(model.train(), device, torch.bfloat16):
        peaks = {m: memory.measure(model, plan.probe_batch(m), fwd, device) for m in (32, 16, 8)}
    print(f"probe peaks, GiB: { {m: round(p / memory.GiB, 2) for m, p in peaks.items()} }")
    assert peaks[32] > peaks[16] > peaks[8] > 0
    chosen, probes, budget = memory.choose(model, plan.micro_candidates, plan.probe_batch, fwd, device,
                                           torch.bfloat16, extra=0)
    assert chosen == 32 and len(probes) == 1  # the tiny layout at 16 s at most: far under a GPU's memory
    room = budget - (peaks[16] + peaks[8]) // 2  # what training adds leaves room for 8, not 16
    chosen, probes, _ = memory.choose(model, plan.micro_candidates, plan.probe_batch, fwd, device, torch.bfloat16,
                                      extra=room)
    # the largest first, then a bisection of the rest: 32 and 16 are over the budget, 8 and 4 under it
    assert chosen == 8 and sorted(p.micro for p in probes) == [4, 8, 16, 32], [p.describe() for p in probes]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())

    # the large-batch mode: micro-batch seconds that divide the global batch, the same probe
    cfg = load_config(str(REPO / "configs" / "test.yaml"), [
        f"output_dir={tmp_path / 'probe-seconds'}", f"data.train_shards=[{synthetic_shards}]", "data.eval_shards={}",
        "data.micro_batch_seconds=auto", "data.global_batch_seconds=240", "data.pack=true", "model.preset=tiny",
        "distributed.precision=bf16", "train.max_steps=2"])
    plan = plan_run(cfg, 1, cuda=True)
    assert plan.micro_candidates[:3] == [240, 120, 80]
    chosen, probes, budget = memory.choose(model, plan.micro_candidates, plan.probe_batch, fwd, device,
                                           torch.bfloat16, extra=0, key="data.micro_batch_seconds")
    assert chosen == 240 and len(probes) == 1 and probes[0].utterances >= 240 // 16, probes[0].describe()

    rows = train(synthetic_shards, tmp_path / "auto", "model.preset=tiny", "distributed.precision=bf16",
                 "data.micro_batch_size=auto", "data.pack=true", "train.max_steps=4", "train.log_every=2",
                 "train.save_final=false")
    assert [r for r in rows if "train/loss" in r]
    recorded = (tmp_path / "auto" / "config.yaml").read_text()
    assert "micro_batch_size: 32" in recorded, recorded


@pytest.mark.parametrize("cudnn_attention", [False, True])
def test_cudnn_attention_switch_decides_the_kernel(cudnn_attention):
    """model.cudnn_attention=false (the default) keeps SDPA off cuDNN's attention, which builds a graph per
    new batch shape; PyTorch's own choice on Hopper is cuDNN's. Kernels read from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from asr_dist.config import ModelArgs
    from asr_dist.models import build_model

    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3}
    model = build_model(ModelArgs(preset="base", mask_time_prob=0.0, cudnn_attention=cudnn_attention), vocab)[0].cuda()
    x = torch.randn(4, 48000, device="cuda")
    mask = torch.ones(4, 48000, dtype=torch.bool, device="cuda")
    mask[1, 30000:] = False
    labels = torch.tensor([[3, 2, 3]] * 4, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_values=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    cudnn_sdpa = [n for n in names if "cudnn" in n.lower() and "sdpa" in n.lower()]
    print(f"cudnn_attention={cudnn_attention}: cuDNN attention kernels {cudnn_sdpa[:3]}")
    if not cudnn_attention:
        assert not cudnn_sdpa, cudnn_sdpa
        # the memory-efficient (cutlass "fmha") or flash kernels, not the math fallback (plain matmuls + softmax)
        assert any("fmha" in n or "flash_fwd" in n for n in names), names[:40]
    torch.backends.cuda.enable_cudnn_sdp(True)  # back to PyTorch's default


def test_sync_free_forward_waits_for_the_gpu_less():
    """model.sync_free_forward (the default): one training forward + backward with SpecAugment and padding
    makes fewer host-device synchronisations than transformers' forward (counted by PyTorch's sync debug
    mode; what is left is PyTorch's CUDA CTC loss copying its offsets), with the same loss."""
    import copy
    import warnings

    import numpy as np

    from asr_dist.config import ModelArgs
    from asr_dist.models import build_model

    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4}
    hf, family = build_model(ModelArgs(preset="base", mask_time_prob=0.2, mask_time_length=2), vocab)
    hf = hf.cuda().train()
    ours = copy.deepcopy(hf)
    assert family.use_sync_free_forward(ours)
    lengths = torch.tensor([48000, 40000, 30000, 20000])
    mask = torch.arange(48000)[None] < lengths[:, None]
    x = torch.randn(4, 48000, device="cuda") * mask.cuda()
    labels = torch.tensor([[3, 2, 4, 3], [4, 4, -100, -100], [3, 2, 3, -100], [4, -100, -100, -100]])

    def syncs(model, **inputs):
        torch.manual_seed(0)
        np.random.seed(0)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, **inputs).loss
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return float(loss), sum("synchroniz" in str(w.message) for w in caught)

    loss_hf, n_hf = syncs(hf, attention_mask=mask.cuda(), labels=labels.cuda())
    loss_ours, n_ours = syncs(ours, lengths=mask.sum(-1), labels=labels)
    print(f"host-device synchronisations in one forward + backward: transformers' forward {n_hf}, sync-free {n_ours}")
    assert n_ours < n_hf
    assert loss_ours == pytest.approx(loss_hf, rel=1e-3)


def test_a_conformer_trains_in_fp16(synthetic_shards, tmp_path):
    """wav2vec2-conformer's batch norm under DeepSpeed's fp16 (fp16 parameters, fp32 running statistics): the
    configuration configs/wav2vec2-conformer.yaml ships, on cuDNN's batch norm."""
    rows = train(synthetic_shards, tmp_path / "conformer", "model.family=wav2vec2-conformer", "model.preset=tiny",
                 "distributed.precision=fp16", "train.max_steps=3", "train.log_every=1", "train.save_final=false")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
