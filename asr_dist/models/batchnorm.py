"""Batch norm under bf16/fp16 training, for the encoders that have one (wav2vec2-conformer's convolution module,
HuBERT's positional convolution with conv_pos_batch_norm).

DeepSpeed casts a module's parameters to the training dtype and keeps its buffers, the running statistics, in
fp32 (data_types.buffer_dtype unset). torch's batch norm takes no such mix ("expected scalar type BFloat16 but
found Float"); and running statistics kept in bf16 could not follow a change of less than 1/256 of their value.
torch's batch norm does take a bf16/fp16 input with fp32 affine parameters and statistics (mixed precision, as
with AMP's fp32 weights): so the affine parameters are taken to fp32 for it (their gradients flow back in their
own dtype), the running statistics stay fp32, and the output is in the input's dtype. A module whose statistics
are in the input's dtype (fp32 training, or buffers cast too) runs torch's own forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Fp32BatchNorm1d(torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d with its affine parameters in its statistics' dtype (fp32) for a bf16/fp16 input (the
    same state dict; see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.running_mean is None or x.dtype == self.running_mean.dtype:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        dtype = self.running_mean.dtype
        return F.batch_norm(x, self.running_mean, self.running_var,
                            None if self.weight is None else self.weight.to(dtype),
                            None if self.bias is None else self.bias.to(dtype), self.training, momentum, self.eps)


def use_fp32_batch_norm(model: torch.nn.Module) -> int:
    """Every torch.nn.BatchNorm1d of ``model`` computed as Fp32BatchNorm1d (its class swapped: the parameters,
    buffers and state-dict keys stay). Returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm1d:
            module.__class__ = Fp32BatchNorm1d
            swapped += 1
    return swapped
