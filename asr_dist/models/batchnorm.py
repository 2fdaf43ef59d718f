"""Batch norm under bf16/fp16 training, for the encoders that have one (wav2vec2-conformer's convolution module,
HuBERT's positional convolution with conv_pos_batch_norm).

DeepSpeed casts a module's parameters to the training dtype and keeps its buffers, the running statistics, in
fp32 (data_types.buffer_dtype unset). torch's batch norm takes no such mix ("expected scalar type BFloat16 but
found Float"); and running statistics kept in bf16 could not follow a change of less than 1/256 of their value.
So the normalisation runs in fp32, as torch's autocast runs it: the input and the affine parameters are taken to
fp32 (their gradients flow back in their own dtype), the running statistics stay fp32, and the output returns
in the input's dtype. In fp32 nothing changes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Fp32BatchNorm1d(torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed in fp32 for a bf16/fp16 input (the same state dict; see the module's
    docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        out = F.batch_norm(x.float(), self.running_mean if track else None, self.running_var if track else None,
                           None if self.weight is None else self.weight.float(),
                           None if self.bias is None else self.bias.float(), batch_stats, momentum, self.eps)
        return out.to(x.dtype)


def use_fp32_batch_norm(model: torch.nn.Module) -> int:
    """Every torch.nn.BatchNorm1d of ``model`` computed as Fp32BatchNorm1d (its class swapped: the parameters,
    buffers and state-dict keys stay). Returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm1d:
            module.__class__ = Fp32BatchNorm1d
            swapped += 1
    return swapped
