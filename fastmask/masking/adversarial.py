"""Adversarial (learned) masks: ADIOS's occluder output, its penalty, gradient reversal, and a
token-level form for patch-based objectives (MAE).

    gen = AdversarialMasking(occluder, alpha_sparsity=0.9)
    masks = gen(view2)                              # [B, N, H, W], softmax over N: a soft partition
    x = apply_pixel_mask(view2, grad_reverse(masks[:, k]))   # hide slot k; reversed gradient
    loss = ssl(view1, x) + gen.penalty(masks)       # one backward trains both players

Mask convention: 1 = hidden. A pixel mask m in [0, 1] hides softly: x * (1 - m) on the normalized
image, so a fully hidden pixel becomes 0, the dataset mean colour (YugeTen/adios).

Why gradient reversal: ADIOS is a min-max game, the encoder minimizes the SSL loss on masked views,
the occluder maximizes it. Reversing the gradient at the occluder's output makes one backward of
`ssl + penalty` give the encoder dSSL/dtheta and the occluder -dSSL/dphi + dPenalty/dphi, exactly
the gradients the official code's occluder step computes from `backward(-m_loss)` (see `penalty`),
so both fit one optimizer step.

The occluder is any module `imgs [B, C, H, W] -> masks [B, N, H, W]` (fastmask.models.unet.Occluder);
this module does not import models, the method passes it in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# 1/(sin(pi s) + eps): the official code's eps keeps the penalty finite at s = 0 or 1.
SPARSITY_EPS = 1e-10


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by -scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x [...] -> the same values; gradients flowing back through it are multiplied by -scale."""
    return GradReverse.apply(x, scale)


def check_masks(masks: torch.Tensor) -> None:
    if not isinstance(masks, torch.Tensor) or masks.dim() != 4 or not masks.is_floating_point():
        desc = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks must be a float [B, N, H, W] tensor, got {desc}")


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """masks [B, N, H, W] -> areas s [B, N] fp32: each slot's mean over pixels (its area fraction)."""
    check_masks(masks)
    return masks.float().mean(dim=(2, 3))


def sparsity_penalty(areas: torch.Tensor, alpha: float) -> torch.Tensor:
    """areas [B, N] in [0, 1] -> fp32 scalar alpha * sum_k mean_b 1 / (sin(pi s_bk) + 1e-10).

    Minimal (alpha * N) when every slot covers half the image; it blows up for empty or
    all-covering slots, which keeps the occluder from the trivial maximizer (hide everything).
    The official code writes this inside the occluder's *maximized* objective as
    sum_k [-alpha * mean_b 1/(sin(pi s_bk) + 1e-10)]; here it is the term the occluder minimizes.
    """
    areas = areas.float()
    return alpha * (1.0 / (torch.sin(math.pi * areas) + SPARSITY_EPS)).mean(dim=0).sum()


def entropy_penalty(areas: torch.Tensor, alpha: float) -> torch.Tensor:
    """areas [B, N] -> fp32 scalar alpha * sum_b H(softmax_k(s_b)), H(p) = -sum_k p_k log p_k.

    The official code adds alpha_e * sum_b sum_k softmax(s_b) log softmax(s_b) (the negative
    entropy, summed over the batch, not averaged) to the maximized objective; minimizing its
    negative is this. The softmax is over the slots' area fractions (ADIOS `Entropy` on [B, N]).
    """
    logp = F.log_softmax(areas.float(), dim=1)
    return -alpha * (logp.exp() * logp).sum()


def occluder_penalty(masks: torch.Tensor, alpha_sparsity: float, alpha_entropy: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [B, N, H, W] -> (penalty fp32 scalar, areas [B, N] fp32).

    penalty = sparsity_penalty + entropy_penalty (the latter only when alpha_entropy != 0), the
    part of the occluder's loss that is not the (reversed) SSL loss. Pass the masks *before*
    grad_reverse: the occluder minimizes the penalty, it does not maximize it.
    """
    areas = mask_areas(masks)
    pen = sparsity_penalty(areas, alpha_sparsity)
    if alpha_entropy:
        pen = pen + entropy_penalty(areas, alpha_entropy)
    return pen, areas


def apply_pixel_mask(imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """imgs [B, C, H, W] (normalized), mask [B, H, W] or [B, 1, H, W] in [0, 1] (1 = hidden)
    -> imgs * (1 - mask) [B, C, H, W], in imgs' dtype."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if imgs.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != imgs.shape[0] \
            or mask.shape[-2:] != imgs.shape[-2:]:
        raise ValueError(f"apply_pixel_mask: imgs must be [B, C, H, W] and mask [B, H, W] or [B, 1, H, W] "
                         f"of the same B, H, W; got {tuple(imgs.shape)} and {tuple(mask.shape)}")
    return imgs * (1 - mask.to(imgs.dtype))


def pick_slots(masks: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [B, N, H, W] -> (mask [B, H, W], slot [B] int64): one slot per sample, uniformly (ADIOS-s).

    `generator` must live on masks' device (None = the global RNG).
    """
    check_masks(masks)
    B, N = masks.shape[:2]
    slot = torch.randint(0, N, (B,), device=masks.device, generator=generator)
    return masks[torch.arange(B, device=masks.device), slot], slot


def patch_occupancy(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """mask [B, H, W] in [0, 1] -> occupancy [B, L] fp32 (L = (H/p)*(W/p), row-major as patchify):
    the mean of the mask over each patch, i.e. how much of the patch the slot covers."""
    if mask.dim() != 3 or mask.shape[-2] % patch_size or mask.shape[-1] % patch_size:
        raise ValueError(f"patch_occupancy: mask must be [B, H, W] with H, W divisible by {patch_size}, "
                         f"got {tuple(mask.shape)}")
    return F.avg_pool2d(mask.float().unsqueeze(1), patch_size).flatten(1)


def token_masking_from_scores(scores: torch.Tensor, mask_ratio: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [B, L] -> (ids_keep [B, K] int64, ids_restore [B, L] int64, mask [B, L] fp32, 1 = hidden).

    MAE's index triple with the random noise replaced by `scores`: ascending sort, the K = int(L *
    (1 - mask_ratio)) lowest-scoring patches are kept, so the highest scores are hidden first.
    Exactly L - K patches are hidden per sample (ties go by the sort's order). Not differentiable
    in `scores`: a learned generator gets its gradient elsewhere (see `AdversarialMasking.token_masks`).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, L], got {tuple(scores.shape)}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    B, L = scores.shape
    K = int(L * (1 - mask_ratio))
    if K < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch out of L = {L}")
    ids_shuffle = torch.argsort(scores.detach(), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L, device=scores.device)
    mask[:, :K] = 0
    return ids_shuffle[:, :K], ids_restore, torch.gather(mask, 1, ids_restore)


class AdversarialMasking(nn.Module):
    """The learned mask generator: wraps an occluder and its penalty.

    forward(imgs [B, C, H, W]) -> masks [B, N, H, W] (not reversed: callers reverse the path that
    feeds the SSL loss, and give these raw masks to `penalty`).
    """

    def __init__(self, occluder: nn.Module, alpha_sparsity: float = 1.0, alpha_entropy: float = 0.0):
        super().__init__()
        self.occluder = occluder
        self.alpha_sparsity, self.alpha_entropy = alpha_sparsity, alpha_entropy

    @property
    def num_masks(self) -> int:
        return self.occluder.num_masks

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.occluder(imgs)

    def penalty(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """masks [B, N, H, W] -> (penalty fp32 scalar, areas [B, N]); see `occluder_penalty`."""
        return occluder_penalty(masks, self.alpha_sparsity, self.alpha_entropy)

    def token_masks(self, imgs: torch.Tensor, mask_ratio: float, patch_size: int,
                    generator: torch.Generator | None = None, reverse: bool = True) -> dict[str, torch.Tensor]:
        """Adversarial masks for a patch objective (MAE): imgs [B, C, H, W] -> dict with
        ids_keep [B, K], ids_restore [B, L], mask [B, L] (1 = hidden), imgs_masked [B, C, H, W],
        penalty (scalar), areas [B, N], slot [B].

        One slot per sample is drawn (as ADIOS-s); its patch occupancy ranks the patches and the
        L - K most occupied ones are hidden, K = int(L * (1 - mask_ratio)) (`token_masking_from_scores`),
        so the ratio is exact and the occluder decides *which* patches go. The hard top-k carries no
        gradient, so the kept patches are also softly occluded: `imgs_masked = imgs * (1 - m)`
        with m gradient-reversed when `reverse`. Feed `imgs_masked` with `ids_keep` to the encoder
        and the original `imgs` as the reconstruction target; `loss + penalty` then trains the
        occluder to make the visible patches less informative, within one backward.
        """
        masks = self(imgs)
        mask_px, slot = pick_slots(masks, generator)
        ids_keep, ids_restore, mask = token_masking_from_scores(patch_occupancy(mask_px, patch_size), mask_ratio)
        m = grad_reverse(mask_px) if reverse else mask_px
        pen, areas = self.penalty(masks)
        return {"ids_keep": ids_keep, "ids_restore": ids_restore, "mask": mask,
                "imgs_masked": apply_pixel_mask(imgs, m), "penalty": pen, "areas": areas, "slot": slot}


__all__ = ["GradReverse", "grad_reverse", "mask_areas", "sparsity_penalty", "entropy_penalty",
           "occluder_penalty", "apply_pixel_mask", "pick_slots", "patch_occupancy",
           "token_masking_from_scores", "AdversarialMasking", "SPARSITY_EPS"]
