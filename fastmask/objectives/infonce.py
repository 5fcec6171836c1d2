"""Contrastive objectives: InfoNCE between queries and keys, and SimCLR's NT-Xent.

Both take raw embeddings, l2-normalize them in fp32 and subtract the (detached) row maximum of the
logits before the softmax, as solo-learn and MoCo do, so bf16 inputs and small temperatures stay
finite. Gradients flow into both arguments: stop-gradient or momentum targets are the caller's
choice (RelaxMIM makes it configurable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import upcast


def _logits(q: torch.Tensor, k: torch.Tensor, temperature: float, normalize: bool) -> torch.Tensor:
    q, k = upcast(q), upcast(k)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = q @ k.transpose(-2, -1) / temperature
    # Max-logit subtraction: softmax-invariant, keeps exp() in range for tiny temperatures.
    return logits - logits.max(dim=-1, keepdim=True).values.detach()


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2,
             positives: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """q [N, d], k [M, d] (or batched: q [G, N, d], k [G, M, d]) -> fp32 scalar:
    mean over queries of -log softmax_j(<q_i, k_j> / temperature)[pos_i].

    positives: int64 [N] (batched: [G, N]) indices into k's M keys (the positive key of each query);
    None = identity (needs N == M: query i's positive is key i, every other key is a negative). In
    the batched form each group's queries see only that group's keys (e.g. the positions of one
    image). Embeddings are l2-normalized first unless `normalize=False`.
    """
    problems = []
    if q.dim() not in (2, 3) or k.dim() != q.dim() or q.shape[-1] != k.shape[-1] \
            or q.shape[:-2] != k.shape[:-2]:
        problems.append(f"q must be [N, d] and k [M, d] (or [G, N, d] and [G, M, d]), got {tuple(q.shape)} "
                        f"and {tuple(k.shape)}")
    elif positives is None and q.shape[-2] != k.shape[-2]:
        problems.append(f"positives=None needs as many queries as keys, got N={q.shape[-2]}, M={k.shape[-2]}")
    elif positives is not None and (positives.shape != q.shape[:-1]
                                    or positives.dtype not in (torch.int64, torch.int32)):
        problems.append(f"positives must be int {list(q.shape[:-1])}, got {positives.dtype} "
                        f"{tuple(positives.shape)}")
    if not temperature > 0:
        problems.append(f"temperature must be > 0, got {temperature}")
    if problems:
        raise ValueError("info_nce: " + "; ".join(problems))
    if positives is None:
        positives = torch.arange(q.shape[-2], device=q.device).expand(q.shape[:-1])
    logits = _logits(q, k, temperature, normalize)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), positives.reshape(-1).long())


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """z1 [B, d], z2 [B, d] (two views of the same B images) -> fp32 scalar: SimCLR's NT-Xent.

    Over the 2B embeddings z = cat(z1, z2): the positive of sample i is its other view, the negatives
    are the remaining 2B - 2 samples, self-similarity is excluded; averaged over all 2B anchors,
    i.e. over both directions.
    """
    problems = []
    if z1.dim() != 2 or z1.shape != z2.shape:
        problems.append(f"z1 and z2 must both be [B, d], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    elif z1.shape[0] < 1:
        problems.append("empty batch")
    if not temperature > 0:
        problems.append(f"temperature must be > 0, got {temperature}")
    if problems:
        raise ValueError("nt_xent: " + "; ".join(problems))
    B = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    z = F.normalize(upcast(z), dim=-1)
    logits = z @ z.t() / temperature
    eye = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    logits = logits - logits.max(dim=-1, keepdim=True).values.detach()
    targets = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    return F.cross_entropy(logits, targets)


__all__ = ["info_nce", "nt_xent"]
