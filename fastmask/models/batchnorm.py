"""BatchNorm layers that keep training when the engine casts the model to bf16/fp16.

DeepSpeed's bf16/fp16 modes cast a module's parameters and keep its buffers in fp32, so a BatchNorm ends
up with bf16 weight and bias, fp32 running statistics and bf16 input: a mix torch's batch_norm rejects
("expected scalar type BFloat16 but found Float"). These layers hand the kernel the weight and bias in
fp32 then, the mixed-type BatchNorm that torch (CPU) and cuDNN run for autocast training: statistics and
normalization in fp32, output in the input's dtype, fp32 running statistics. With matching dtypes
(an fp32 model) they are torch's layers unchanged; names and state dicts are torch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _MixedPrecision:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, mean = self.weight, self.bias, self.running_mean
        if w is None or mean is None or w.dtype == mean.dtype:
            return super().forward(x)
        self._check_input_dim(x)
        factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if factor is None:  # cumulative average, as torch's layer
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, mean, self.running_var, w.float(), b.float(), self.training, factor or 0.0,
                            self.eps)


class BatchNorm1d(_MixedPrecision, nn.BatchNorm1d):
    """x [B, C] or [B, C, L] -> same; torch's BatchNorm1d, fp32 compute under a bf16/fp16 cast."""


class BatchNorm2d(_MixedPrecision, nn.BatchNorm2d):
    """x [B, C, H, W] -> same; torch's BatchNorm2d, fp32 compute under a bf16/fp16 cast."""


__all__ = ["BatchNorm1d", "BatchNorm2d"]
