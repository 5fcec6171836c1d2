"""Shared by the loss modules: the accumulation dtype of a loss."""
import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses run in fp32 whatever the activations' dtype (bf16/fp16 -> fp32); fp64 stays fp64 (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()
