"""asr_dist.step.train_step, called on a real DeepSpeed engine (one CPU rank, in a process of its own: a
process group and DeepSpeed's caches outlive the call)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VOCAB = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4, "c": 5}


def _batch(lengths: list[int], seed: int) -> dict:
    import numpy as np

    from asr_dist.data.samples import collate

    rng = np.random.default_rng(seed)
    samples = [(f"u{seed}-{i}", rng.standard_normal(n).astype(np.float32), list(rng.integers(2, 6, 3 + i)), "")
               for i, n in enumerate(lengths)]
    return collate(samples)


def scenario() -> None:
    """Run in a child process by the test below; asserts, and exits non-zero on a failure."""
    import copy

    import deepspeed
    import torch

    from asr_dist.config import ModelArgs
    from asr_dist.distributed import get_env, init_process_group
    from asr_dist.models import build_model
    from asr_dist.step import NonFiniteStep, StepSpec, train_step

    init_process_group(get_env(), 5)
    torch.manual_seed(0)
    model, family = build_model(ModelArgs(preset="tiny", mask_time_prob=0.0), VOCAB)
    reference = copy.deepcopy(model)
    assert family.use_sync_free_forward(model)
    lr = 0.05
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
          "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      optimizer=torch.optim.SGD(params, lr=lr), config=ds)
    spec = StepSpec(input_name="input_values", device=torch.device("cpu"), input_dtype=torch.float32, sync_free=True,
                    num_layers=4, check_finite=True)
    batches = [_batch([4000, 5600], seed=1), _batch([7000, 6100], seed=2)]

    # the reference: transformers' forward, each micro-batch's mean loss / 2 (DeepSpeed's accumulation), one SGD step
    losses = []
    for b in batches:
        loss = reference(input_values=b["input_values"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        (loss / 2).backward()
        losses.append(float(loss))
    result = train_step(engine, batches, step=0, spec=spec)
    assert engine.global_steps == 1 and result.utterances == 4 and result.keys == [*batches[0]["keys"], *batches[1]["keys"]]
    assert abs(float(result.loss_sum) - 2 * sum(losses)) < 1e-4 * sum(losses), (float(result.loss_sum), losses)
    assert abs(result.audio_seconds - (4000 + 5600 + 7000 + 6100) / 16000) < 1e-6
    with torch.no_grad():
        moved = 0
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if q.grad is None:
                continue
            expected = q - lr * q.grad
            assert torch.allclose(p, expected, rtol=1e-4, atol=1e-6), (name, float((p - expected).abs().max()))
            moved += int(not torch.equal(p, q))
        assert moved > 10, moved

    # a step's micro-batches must be DeepSpeed's accumulation of them
    try:
        train_step(engine, batches[:1] * 3, step=1, spec=spec)
    except RuntimeError as e:
        assert "gradient_accumulation_steps=2" in str(e), e
    else:
        raise AssertionError("three micro-batches for an accumulation of 2 were taken")

    # inf/NaN gradients are stopped before the weights change (ZeRO-0 without fp16 has no overflow check)
    reference.zero_grad(set_to_none=True)
    engine2, *_ = deepspeed.initialize(model=reference, model_parameters=[p for p in reference.parameters()
                                                                          if p.requires_grad],
                                       optimizer=torch.optim.SGD([p for p in reference.parameters() if p.requires_grad],
                                                                 lr=lr), config=ds)
    family.use_sync_free_forward(reference)
    before = [p.detach().clone() for p in reference.parameters()]
    bad = _batch([4000, 5600], seed=3)
    bad["input_values"][0, 100] = float("nan")
    try:
        train_step(engine2, [batches[0], bad], step=0, spec=spec)
    except NonFiniteStep as e:
        assert e.keys == [*batches[0]["keys"], *bad["keys"]], e.keys
    else:
        raise AssertionError("a NaN input went through the step")
    assert all(torch.equal(a, b) for a, b in zip(before, reference.parameters()))
    assert engine2.global_steps == 0


@pytest.mark.slow  # imports DeepSpeed in a process of its own
def test_train_step_takes_one_optimizer_step_from_its_micro_batches():
    """train_step on two micro-batches (accumulation 2) moves the weights as one SGD step on the mean of their
    losses does, returns their loss summed per utterance and their audio, refuses a batch count that is not
    DeepSpeed's accumulation, and stops an inf/NaN step before the weights change."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", "import tests.test_step as t; t.scenario()"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
