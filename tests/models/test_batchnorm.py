"""Batch norm under bf16: DeepSpeed casts the parameters and keeps the running statistics in fp32, which torch's
batch norm refuses; asr_dist.models.batchnorm normalises in fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from asr_dist.models.batchnorm import Fp32BatchNorm1d, use_fp32_batch_norm
from trainkit import launch, losses, overrides


def test_bf16_batch_norm_normalises_in_fp32_and_keeps_its_statistics_in_fp32():
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(6))
    model[0].load_state_dict(reference.state_dict())
    assert use_fp32_batch_norm(model) == 1 and type(model[0]) is Fp32BatchNorm1d
    bn = model[0]
    for p in bn.parameters():  # as DeepSpeed's bf16 engine holds them: parameters cast, buffers kept
        p.data = p.data.bfloat16()
    x = (torch.randn(4, 6, 9) * 3 + 1).bfloat16()
    with pytest.raises(RuntimeError):  # the mix torch's own batch norm refuses
        torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True)

    x.requires_grad_(True)
    out = bn(x)
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.bfloat16().float())
    expected = reference(x.detach().float())
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.01)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)  # updated in fp32, as fp32's
    torch.testing.assert_close(bn.running_var, reference.running_var)
    assert int(bn.num_batches_tracked) == 1
    out.float().pow(2).sum().backward()
    assert bn.weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16  # in the parameters' own dtype
    assert bn.weight.grad.abs().sum() > 0 and torch.isfinite(x.grad.float()).all()

    bn.eval()  # the running statistics normalise
    torch.testing.assert_close(bn(x.detach()).float(), reference.eval()(x.detach().float()), atol=0.02, rtol=0.01)
    fp32 = torch.randn(2, 6, 5)  # fp32 input and parameters: torch's own batch norm, bit for bit
    same = torch.nn.Sequential(copy.deepcopy(reference).train())
    use_fp32_batch_norm(same)
    assert torch.equal(same(fp32), reference.train()(fp32))
    assert torch.equal(same[0].running_var, reference.running_var)
    for dtype in (torch.bfloat16, torch.float64):  # statistics in the input's dtype: torch's own forward too
        whole = torch.nn.Sequential(copy.deepcopy(reference)).to(dtype)
        use_fp32_batch_norm(whole)
        assert whole(fp32.to(dtype)).dtype == dtype


def test_a_conformer_trains_in_bf16(train_shards, tmp_path):
    """wav2vec2-conformer's convolution module has a batch norm; under DeepSpeed's bf16 it stopped at the first
    forward ("expected scalar type BFloat16 but found Float")."""
    out = tmp_path / "run"
    r = launch("python", overrides(train_shards, out, "model.family=wav2vec2-conformer", "model.preset=tiny",
                                   "distributed.precision=bf16", "train.max_steps=3", "eval.every_steps=0",
                                   "data.eval_shards={}", "train.checkpoint_every=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = losses(out)
    assert len(run) == 3 and all(torch.isfinite(torch.tensor(v)) for v in run.values())
