"""data.micro_batch_size=auto (asr_dist.memory, asr_dist.plan): the candidates, the batch the probe runs, and
what it leaves behind. The probe's measurement itself needs a GPU's allocator: tests/gpu runs it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asr_dist import memory
from asr_dist.checkpoint import MARKER
from asr_dist.config import ConfigError, load_config
from asr_dist.models import build_model
from asr_dist.plan import plan_run
from asr_dist.step import StepSpec, forward

REPO = Path(__file__).resolve().parents[1]


def config(shards: Path, tmp_path: Path, *extra: str):
    return load_config(str(REPO / "configs" / "test.yaml"),
                       [f"output_dir={tmp_path / 'run'}", f"data.train_shards=[{shards / 's-train'}]",
                        "data.eval_shards={}", "data.global_batch_size=8", "data.micro_batch_size=auto",
                        "distributed.precision=fp32", "train.max_steps=null", "train.num_epochs=1", *extra])


def test_candidates_make_up_the_global_batch():
    assert memory.candidates(32, 1) == [32, 16, 8, 4, 2, 1]
    assert memory.candidates(32, 2) == [16, 8, 4, 2, 1]
    assert memory.candidates(48, 1) == [48, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    assert memory.candidates(32, 3) == []
    assert memory.cpu_choice(memory.candidates(48, 1)) == 16 and memory.cpu_choice(memory.candidates(40, 1)) == 10


def test_what_training_adds_to_the_probe():
    """XLS-R-300M's 311 M trainable parameters in bf16 on one rank: 16 bytes each (fp32 master, Adam's two
    moments, fp32 gradients) and DeepSpeed's 200 M-element bucket in bf16; fp32 keeps no master copy; from
    ZeRO-1 on the optimizer's part is divided over the ranks."""
    p = 311_000_000
    assert memory.held_by_training(p, "bf16", 1, 1, 200_000_000) == 16 * p + 2 * 200_000_000
    assert memory.held_by_training(p, "fp32", 1, 1, 200_000_000) == 16 * p + 4 * 200_000_000  # ZeRO's own partitions
    assert memory.held_by_training(p, "fp32", 0, 1, 200_000_000) == 8 * p + 4 * 200_000_000
    assert memory.held_by_training(p, "bf16", 1, 8, 200_000_000) == 2 * p + 2 * 200_000_000
    assert memory.held_by_training(p, "bf16", 0, 8, 200_000_000) == 16 * p + 2 * 200_000_000
    assert memory.held_by_training(1000, "fp16", 2, 1, 200_000_000) == 16 * 1000 + 2 * 1000


def test_auto_takes_the_largest_up_to_16_without_a_gpu(train_shards, tmp_path):
    plan = plan_run(config(train_shards, tmp_path), world_size=1)
    assert (plan.cfg.data.micro_batch_size, plan.accumulation, plan.micro_candidates) == (8, 1, [])
    plan = plan_run(config(train_shards, tmp_path, "data.global_batch_size=48"), world_size=2)
    assert (plan.cfg.data.micro_batch_size, plan.accumulation) == (12, 2)
    assert plan.ds_config["train_micro_batch_size_per_gpu"] == 12


def test_auto_on_a_gpu_plans_the_largest_until_the_probe_settles_it(train_shards, tmp_path):
    plan = plan_run(config(train_shards, tmp_path), world_size=1, cuda=True)
    assert plan.micro_candidates == [8, 4, 2, 1] and plan.accumulation == 1
    assert "data.micro_batch_size=auto: the largest of 8, 4, 2, 1 that fits the GPU" in plan.describe(check_alignment=False)
    plan.use_micro_batch(2)
    assert (plan.cfg.data.micro_batch_size, plan.accumulation, plan.micro_candidates) == (2, 4, [])
    assert plan.ds_config["train_micro_batch_size_per_gpu"] == 2 and plan.ds_config["gradient_accumulation_steps"] == 4
    assert plan.loader(1).micro_batch_size == 2 and plan.loader(1).accumulation == 4


def test_a_resume_keeps_the_runs_first_choice(train_shards, tmp_path):
    """output_dir/config.yaml records the size auto chose; a resume from a checkpoint takes it without probing
    (the same micro-batches, so the resume is exact); no checkpoint, train.resume=never, or a size that no
    longer makes up the global batch on this many ranks, probes anew."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data:\n  micro_batch_size: 2\n")
    plan = plan_run(config(train_shards, tmp_path), world_size=1, cuda=True)
    assert plan.micro_candidates == [8, 4, 2, 1]  # no checkpoint to resume: probed again
    saved = tmp_path / "run" / "checkpoints" / "step-00000003"
    saved.mkdir(parents=True)
    (saved / MARKER).write_text("{}")
    plan = plan_run(config(train_shards, tmp_path), world_size=1, cuda=True)
    assert (plan.cfg.data.micro_batch_size, plan.micro_candidates, plan.accumulation) == (2, [], 4)
    plan = plan_run(config(train_shards, tmp_path, "train.resume=never"), world_size=1, cuda=True)
    assert plan.micro_candidates == [8, 4, 2, 1]
    (tmp_path / "run" / "config.yaml").write_text("data:\n  micro_batch_size: 8\n")
    plan = plan_run(config(train_shards, tmp_path), world_size=2, cuda=True)
    assert plan.micro_candidates == [4, 2, 1]


def test_config_says_what_auto_takes(train_shards, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="data.micro_batch_size takes a whole number or auto, not 'two'"):
        config(train_shards, tmp_path, "data.micro_batch_size=two")
    with pytest.raises(ConfigError, match="data.micro_batch_size takes a whole number or auto, not 2.5"):
        config(train_shards, tmp_path, "data.micro_batch_size=2.5")
    # a number that arrives as text (an environment interpolation, a quoted value) is that number
    monkeypatch.setenv("ASR_DIST_TEST_MICRO", "4")
    with pytest.raises(ConfigError, match="the large-batch mode takes both"):
        config(train_shards, tmp_path, "data.micro_batch_seconds=inf", "data.global_batch_seconds=60")
    from_env = config(train_shards, tmp_path, "data.micro_batch_size=${oc.env:ASR_DIST_TEST_MICRO}")
    assert from_env.data.micro_batch_size == 4
    assert config(train_shards, tmp_path, "data.micro_batch_size='2'").data.micro_batch_size == 2
    with pytest.raises(ConfigError, match="auto with distributed.zero_stage=3"):
        config(train_shards, tmp_path, "distributed.zero_stage=3")
    with pytest.raises(ConfigError, match="not a multiple of the 3 ranks"):
        plan_run(config(train_shards, tmp_path), world_size=3)
    # the large-batch mode counts seconds: auto is left unused there
    cfg = config(train_shards, tmp_path, "data.micro_batch_seconds=20", "data.global_batch_seconds=40")
    assert plan_run(cfg, world_size=1, cuda=True).micro_candidates == []


@pytest.mark.parametrize("pack", [False, True])
def test_the_probe_runs_the_longest_micro_batch_through_the_training_forward(train_shards, tmp_path, pack):
    """The probe's batch is the longest the run can meet: packed, exactly the largest packing capacity; padded,
    its size's longest utterances at the longest length. Every micro-batch of an epoch fits in it, and it runs
    through the step's forward and backward (a finite loss: its labels can be aligned)."""
    extra = ["data.pack=true"] if pack else ["data.pad_to_multiple_of=160"]
    plan = plan_run(config(train_shards, tmp_path, *extra), world_size=1, cuda=True)
    lengths = plan.loader(0).lengths()
    batch = plan.probe_batch(4)
    assert len(batch["keys"]) == 4 and math.isclose(float(batch["durations"].sum()), np.sort(lengths)[-4:].sum() / 16000,
                                                    rel_tol=1e-6)
    plan.use_micro_batch(4)
    loader = plan.loader(0)
    if pack:
        assert batch["input_values"].shape == (1, loader.capacities[-1])
        assert sorted(batch["lengths"].tolist()) == sorted(np.sort(lengths)[-4:].tolist())
    else:
        longest = -(-int(lengths.max()) // 160) * 160
        assert batch["input_values"].shape == (4, longest)
    loader.set_epoch(0)
    for b in loader.plan():  # no micro-batch of the epoch is longer than the probe's
        n = b["num_samples"]
        assert (sum(-(-x // 320) * 320 for x in n) if pack else len(n) * max(n)) <= batch["input_values"].numel()

    model, family = build_model(plan.cfg.model, plan.vocab, family=plan.family, config=plan.model_config)
    assert family.use_sync_free_forward(model)
    spec = StepSpec(input_name=family.input_name, device=torch.device("cpu"), input_dtype=torch.float32, sync_free=True)
    model.train()
    loss = forward(model, batch, spec)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0


def test_the_probe_leaves_the_model_and_the_random_generators_as_they_were(train_shards, tmp_path):
    plan = plan_run(config(train_shards, tmp_path, "model.mask_time_prob=0.3", "model.hidden_dropout=0.1"), world_size=1)
    model, family = build_model(plan.cfg.model, plan.vocab, family=plan.family, config=plan.model_config)
    family.use_sync_free_forward(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    places = [(p.data_ptr(), p.dtype, p.device) for p in model.parameters()]
    state, np_state = torch.get_rng_state(), np.random.get_state()
    spec = StepSpec(input_name=family.input_name, device=torch.device("cpu"), input_dtype=torch.bfloat16, sync_free=True)
    model.train()
    with memory.on_device(model, torch.device("cpu"), torch.bfloat16):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        # SpecAugment draws from numpy's generator, dropout from torch's
        forward(model, plan.probe_batch(2), spec).backward()
        assert not torch.equal(torch.get_rng_state(), state) and np.random.get_state()[2] != np_state[2]
    assert [(p.data_ptr(), p.dtype, p.device) for p in model.parameters()] == places  # the very tensors
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(np.random.get_state(), np_state))


def test_the_probe_puts_back_a_buffer_its_forward_replaced():
    """The conformer's positional table is a buffer its forward replaces with a longer one (in the input's dtype):
    after the probe the module holds the tensor it held before."""

    class Grows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))
            self.register_buffer("table", torch.zeros(2))

        def forward(self, x):
            self.table = torch.ones(4, dtype=x.dtype)
            return (self.weight * x).sum()

    model = Grows()
    table = model.table
    with memory.on_device(model, torch.device("cpu"), torch.bfloat16):
        model(torch.ones(3, dtype=torch.bfloat16)).backward()
        assert model.table.shape == (4,)
    assert model.table is table and model.table.dtype == torch.float32 and torch.equal(table, torch.zeros(2))
    assert model.weight.dtype == torch.float32 and model.weight.grad is None


def test_an_allocation_failure_of_a_gpu_library_counts_as_out_of_memory():
    assert memory.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert memory.out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert memory.out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"))
    assert not memory.out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_INITIALIZED"))  # a driver's, not memory
    assert not memory.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not memory.out_of_memory(ValueError("out of memory"))


def test_the_probe_pads_feature_frames_in_frames(train_shards, tmp_path):
    """w2v-BERT's input is fbank frames (320 samples each): data.pad_to_multiple_of=16000 pads its probe to
    whole seconds of frames (50), as its loader does, not to 16000 frames."""
    plan = plan_run(config(train_shards, tmp_path, "model.family=wav2vec2-bert", "data.pad_to_multiple_of=16000"),
                    world_size=1, cuda=True)
    batch = plan.probe_batch(2)
    frames = batch["input_values"].shape[1]
    assert batch["input_values"].shape[2] == 160 and frames % 50 == 0 and frames <= 50 * 20, frames


def test_the_search_finds_the_largest_that_fits_in_few_probes():
    """The largest first (it usually fits: one probe), then a bisection of the rest: for every list length and
    every point where the candidates start to fit, the first that fits, in at most 2 + log2(n) probes."""
    for n in range(0, 70):
        for first in range(0, n + 1):  # first == n: none fits
            probed = []
            found = memory.search(n, lambda i: probed.append(i) or i >= first)
            assert found == first, (n, first, probed)
            assert len(probed) <= 2 + math.log2(max(1, n)) and len(set(probed)) == len(probed)
            assert n == 0 or probed[0] == 0


def test_seconds_candidates_make_up_the_global_batch_and_hold_the_longest():
    seconds = memory.seconds_candidates(1200, 2, 15)
    assert seconds[:4] == [600, 300, 200, 150] and len(seconds) == 40 and seconds[-1] == 15
    assert all(math.isclose(600 / s, round(600 / s)) for s in seconds)
    assert memory.seconds_candidates(20, 2, 15) == []
    assert memory.cpu_seconds_choice(seconds, 15) == 200 and memory.cpu_seconds_choice([600.0, 300.0], 15) == 300
    lengths = np.array([16000 * 15, 16000 * 10, 16000 * 14, 16000 * 2])
    assert memory.worst_count(lengths, 45) == 3 and memory.worst_count(lengths, 44.9) == 3  # it reaches the seconds
    assert memory.worst_count(lengths, 30.1) == 3 and memory.worst_count(lengths, 30) == 2
    assert memory.worst_count(lengths, 10) == 1 and memory.worst_count(lengths, 600) == 4


AGREEMENTS = [([0, 2], [False, False], 2), ([6, 1], [False, False], 6), ([0, 0], [True, False], -1)]


def _agree(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    seen = [memory.agree(choices[rank], 6, raised[rank]) for choices, raised, _ in AGREEMENTS]
    Path(f"{out}.{rank}").write_text(" ".join(map(str, seen)))
    dist.destroy_process_group()


def test_ranks_agree_on_the_smallest_choice(tmp_path):
    """Two gloo ranks: the smallest candidate (the largest index) wins, none fitting on one rank (index 6 of 6)
    is none for all, and a rank whose probe raised makes every rank see -1."""
    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "agreed")), nprocs=2)
    agreed = " ".join(str(a) for _, _, a in AGREEMENTS)
    assert [(tmp_path / f"agreed.{r}").read_text() for r in range(2)] == [agreed, agreed]


@pytest.mark.parametrize("pack", [False, True])
def test_micro_batch_seconds_auto(train_shards, tmp_path, pack):
    """data.micro_batch_seconds=auto in the large-batch mode: settled without a GPU; on one, the seconds that
    divide the global batch and hold the longest utterance, the largest planned until the probe settles it. The
    probe's batch is the epoch's worst (packed: exactly the largest capacity; padded: within one utterance of
    the seconds), runs through the training forward, and a resume keeps the run's choice."""
    extra = ["data.micro_batch_seconds=auto", "data.global_batch_seconds=64", "data.micro_batch_size=1",
             *(["data.pack=true"] if pack else [])]
    plan = plan_run(config(train_shards, tmp_path, *extra), world_size=1)
    longest = plan.shards.max_seconds
    assert plan.micro_candidates == [] and plan.cfg.data.micro_batch_seconds == memory.cpu_seconds_choice(
        memory.seconds_candidates(64, 1, longest), longest)

    plan = plan_run(config(train_shards, tmp_path, *extra), world_size=2, cuda=True)
    assert plan.micro_candidates == memory.seconds_candidates(64, 2, longest) and plan.micro_candidates[0] == 32
    assert (plan.cfg.data.micro_batch_seconds, plan.accumulation) == (32, 1)
    assert (f"data.micro_batch_seconds=auto: the largest of {len(plan.micro_candidates)} from 32 s down to "
            f"{plan.micro_candidates[-1]:g} s that fits the GPU") in plan.describe(check_alignment=False)
    seconds = plan.micro_candidates[3]  # 8 s: 4 micro-batches per step on each of 2 ranks
    batch = plan.probe_batch(seconds)
    plan.use_micro_batch(seconds)
    assert (plan.cfg.data.micro_batch_seconds, plan.accumulation, plan.micro_candidates) == (8, 4, [])
    assert plan.ds_config["gradient_accumulation_steps"] == 4
    loader = plan.loader(0)
    lengths = loader.lengths()
    budget = seconds * 16000
    count = len(batch["keys"])
    assert budget <= count * lengths.max() < budget + lengths.max()  # the longest, enough to reach the seconds
    if pack:
        assert batch["input_values"].shape[1] >= loader.capacities[-1]
    loader.set_epoch(0)
    seen = [(len(b["keys"]), int(b["durations"].max() * 16000), b["input_values"].numel()) for b in loader]
    # no micro-batch of the epoch holds more utterances of more samples, nor a larger input, than the probe's
    assert seen and all(n * longest <= count * lengths.max() + 1 for n, longest, _ in seen), seen
    assert all(size <= batch["input_values"].numel() for _, _, size in seen), seen

    model, family = build_model(plan.cfg.model, plan.vocab, family=plan.family, config=plan.model_config)
    assert family.use_sync_free_forward(model)
    spec = StepSpec(input_name=family.input_name, device=torch.device("cpu"), input_dtype=torch.float32, sync_free=True)
    loss = forward(model.train(), batch, spec)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0

    saved = tmp_path / "run" / "checkpoints" / "step-00000003"
    saved.mkdir(parents=True)
    (saved / MARKER).write_text("{}")
    (tmp_path / "run" / "config.yaml").write_text(f"data:\n  micro_batch_seconds: {64 / 2 / 4!r}\n")
    plan = plan_run(config(train_shards, tmp_path, *extra), world_size=2, cuda=True)
    assert (plan.cfg.data.micro_batch_seconds, plan.micro_candidates, plan.accumulation) == (8, [], 4)
