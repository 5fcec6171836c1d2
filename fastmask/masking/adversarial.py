"""Adversarial (learned) masks: ADIOS's occluder output, its penalty, gradient reversal, and a
token-level form for patch-based objectives (MAE).

    gen = AdversarialMasking(occluder=occluder, alpha_sparsity=0.9)
    masks = gen.pixel_masks(view2)                  # [B, N, H, W], softmax over N: a soft partition
    x = apply_pixel_mask(view2, grad_reverse(masks[:, k]))   # hide slot k; reversed gradient
    penalty, areas = gen.penalty(masks)
    loss = ssl(view1, x) + penalty                  # one backward trains both players

Mask convention: 1 = hidden. A pixel mask m in [0, 1] hides softly: x * (1 - m) on the normalized
image, so a fully hidden pixel becomes 0, the dataset mean colour (YugeTen/adios).

Why gradient reversal: ADIOS is a min-max game, the encoder minimizes the SSL loss on masked views,
the occluder maximizes it. Reversing the gradient at the occluder's output makes one backward of
`ssl + penalty` give the encoder dSSL/dtheta and the occluder -dSSL/dphi + dPenalty/dphi, exactly
the gradients the official code's occluder step computes from `backward(-m_loss)` (see `penalty`),
so both fit one optimizer step.

The occluder is any module `imgs [B, C, H, W] -> masks [B, N, H, W]` (fastmask.models.unet.Occluder),
passed in by the method; only the registry path (`build_masker("adversarial", ...)`) builds one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..draws import Draws, as_draws
from .base import MaskGenerator, Masks, check_ratio, masks_from_shuffle, register_masker

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
        desc = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) \
            else type(masks).__name__
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


def occluder_penalty(masks: torch.Tensor, alpha_sparsity: float, alpha_entropy: float = 0.0, views: int = 1,
                     joint_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [V*B, N, H, W] (V views of B images, view-major: one occluder call on cat(views))
    -> (penalty fp32 scalar, areas [B, V*N] fp32: sample b's V*N (view, slot) areas, view-major).

    penalty = sparsity_penalty(areas) + entropy term (only when alpha_entropy != 0), the part of the
    occluder's loss that is not the (reversed) SSL loss. Pass the masks *before* grad_reverse: the
    occluder minimizes the penalty, it does not maximize it. As the official code (V = 2 for
    SimSiam-ADIOS, which occludes both views; V = 1 otherwise):
    - sparsity: each (view, slot)'s batch mean of 1/(sin(pi s) + eps), summed over all V*N of them;
    - entropy: `joint_entropy` takes the softmax over all V*N areas of a sample (SimSiam-ADIOS stacks
      both views' areas to [B, 2N]); otherwise over each view's N, summed over views (SimSiam-ADIOS-s).
    """
    areas = mask_areas(masks)
    if areas.shape[0] % views:
        raise ValueError(f"occluder_penalty: {areas.shape[0]} mask rows are not {views} views of one batch")
    per_view = areas.unflatten(0, (views, -1))                  # [V, B, N]
    areas = per_view.transpose(0, 1).flatten(1)                 # [B, V*N]
    pen = sparsity_penalty(areas, alpha_sparsity)
    if alpha_entropy:
        pen = pen + (entropy_penalty(areas, alpha_entropy) if joint_entropy
                     else sum(entropy_penalty(a, alpha_entropy) for a in per_view.unbind(0)))
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


def masked_copies(imgs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """imgs [B, C, H, W], masks [K, B, H, W] (1 = hidden) -> [K*B, C, H, W]: copy k is
    imgs * (1 - masks[k]), stacked k-major (rows k*B .. k*B + B - 1), ready for one encoder call."""
    if imgs.dim() != 4 or masks.dim() != 4 or masks.shape[1] != imgs.shape[0] \
            or masks.shape[-2:] != imgs.shape[-2:]:
        raise ValueError("masked_copies: imgs must be [B, C, H, W] and masks [K, B, H, W] of the same B, "
                         f"H, W; got {tuple(imgs.shape)} and {tuple(masks.shape)}")
    out = imgs.unsqueeze(0) * (1 - masks.to(imgs.dtype).unsqueeze(2))
    return out.flatten(0, 1)


def pick_slots(masks: torch.Tensor, generator: torch.Generator | None = None,
               draws: Draws | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [B, N, H, W] -> (mask [B, H, W], slot [B] int64): one slot per sample, uniformly (ADIOS-s),
    from `draws` (per-sample keyed) or else `generator` (on masks' device; None = the global RNG)."""
    check_masks(masks)
    B, N = masks.shape[:2]
    slot = as_draws(B, draws, generator, masks.device, "pick_slots").randint(N).to(masks.device)
    return masks[torch.arange(B, device=masks.device), slot], slot


def patch_occupancy(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """mask [B, H, W] in [0, 1] -> occupancy [B, L] fp32 (L = (H/p)*(W/p), row-major as patchify):
    the mean of the mask over each patch, i.e. how much of the patch the slot covers."""
    if mask.dim() != 3 or mask.shape[-2] % patch_size or mask.shape[-1] % patch_size:
        raise ValueError(f"patch_occupancy: mask must be [B, H, W] with H, W divisible by {patch_size}, "
                         f"got {tuple(mask.shape)}")
    return F.avg_pool2d(mask.float().unsqueeze(1), patch_size).flatten(1)


def token_masking_from_scores(scores: torch.Tensor, mask_ratio: float) -> Masks:
    """scores [B, L] -> Masks(ids_keep [B, K] int64, ids_restore [B, L] int64, mask [B, L] fp32, 1 = hidden).

    MAE's index triple with the random noise replaced by `scores`: ascending sort, the K = int(L *
    (1 - mask_ratio)) lowest-scoring patches are kept, so the highest scores are hidden first.
    Exactly L - K patches are hidden per sample (ties go by the sort's order). Not differentiable
    in `scores`: a learned generator gets its gradient elsewhere (see `AdversarialMasking.token_masks`).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, L], got {tuple(scores.shape)}")
    mask_ratio = check_ratio(mask_ratio, "token_masking_from_scores")
    L = scores.shape[1]
    K = int(L * (1 - mask_ratio))
    if K < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch out of L = {L}")
    return masks_from_shuffle(torch.argsort(scores.detach(), dim=1, stable=True), K)


@register_masker("adversarial")
class AdversarialMasking(MaskGenerator):
    """The learned mask generator: an occluder plus its penalty, in pixel and in token form.

    Pixel form (ADIOS): `pixel_masks(imgs [B, C, H, W]) -> [B, N, H, W]`, not reversed: callers
    reverse the path that feeds the SSL loss and give these raw masks to `penalty`.
    Token form (the registry's interface, for MAE): `masker(B, grid, draws=d, imgs=imgs)
    -> Masks`, see `token_masks`; the soft-occluded images and the penalty of that call are left
    in `self.aux` ({"imgs_masked", "penalty", "areas", "slot"}) for the method to use.

    occluder: a module imgs -> [B, N, H, W] (softmax over N); None builds
    `fastmask.models.unet.Occluder(img_size, num_masks, fbase, norm)`.
    """

    def __init__(self, mask_ratio: float = 0.75, occluder: nn.Module | None = None, img_size: int = 224,
                 num_masks: int = 4, fbase: int = 32, norm: str = "in", alpha_sparsity: float = 1.0,
                 alpha_entropy: float = 0.0):
        super().__init__()
        self.mask_ratio = check_ratio(mask_ratio, "adversarial masking")
        if occluder is None:
            from ..models.unet import Occluder  # built here only for registry use (MAE + adversarial)

            occluder = Occluder(img_size, num_masks=num_masks, fbase=fbase, norm=norm)
        self.occluder = occluder
        self.alpha_sparsity, self.alpha_entropy = float(alpha_sparsity), float(alpha_entropy)
        self.aux: dict[str, torch.Tensor] = {}

    @property
    def num_masks(self) -> int:
        return self.occluder.num_masks

    def pixel_masks(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> soft masks [B, N, H, W], every pixel's N values summing to 1."""
        return self.occluder(imgs)

    def penalty(self, masks: torch.Tensor, views: int = 1, joint_entropy: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """masks [V*B, N, H, W] -> (penalty fp32 scalar, areas [B, V*N]); see `occluder_penalty`."""
        return occluder_penalty(masks, self.alpha_sparsity, self.alpha_entropy, views, joint_entropy)

    def token_masks(self, imgs: torch.Tensor, patch_size: int, generator: torch.Generator | None = None,
                    reverse: bool = True, draws: Draws | None = None) -> dict[str, torch.Tensor]:
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
        masks = self.pixel_masks(imgs)
        mask_px, slot = pick_slots(masks, generator, draws)
        ids_keep, ids_restore, mask = token_masking_from_scores(patch_occupancy(mask_px, patch_size),
                                                                self.mask_ratio)
        m = grad_reverse(mask_px) if reverse else mask_px
        pen, areas = self.penalty(masks)
        return {"ids_keep": ids_keep, "ids_restore": ids_restore, "mask": mask,
                "imgs_masked": apply_pixel_mask(imgs, m), "penalty": pen, "areas": areas, "slot": slot}

    def forward(self, batch_size: int, grid: int | tuple[int, int], device: torch.device | str | None = None,
                generator: torch.Generator | None = None, draws: Draws | None = None,
                imgs: torch.Tensor | None = None, **context) -> Masks:
        """The registry interface: needs `imgs` [B, C, H, W] in the context and a 2-D grid (h, w)."""
        if imgs is None or not isinstance(grid, tuple) or imgs.shape[0] != batch_size \
                or imgs.shape[-2] % grid[0] or imgs.shape[-1] % grid[1] \
                or imgs.shape[-2] // grid[0] != imgs.shape[-1] // grid[1]:
            raise ValueError("adversarial masking needs imgs=[B, C, H, W] in its context and a patch grid "
                             f"(h, w) dividing H, W with square patches; got grid={grid!r}, "
                             f"batch_size={batch_size}, imgs={None if imgs is None else tuple(imgs.shape)}")
        self.aux = self.token_masks(imgs, imgs.shape[-2] // grid[0], generator, draws=draws)
        return Masks(self.aux["ids_keep"], self.aux["ids_restore"], self.aux["mask"])

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, alpha_sparsity={self.alpha_sparsity}, "
                f"alpha_entropy={self.alpha_entropy}")


__all__ = ["GradReverse", "grad_reverse", "mask_areas", "sparsity_penalty", "entropy_penalty",
           "occluder_penalty", "apply_pixel_mask", "masked_copies", "pick_slots", "patch_occupancy",
           "token_masking_from_scores", "AdversarialMasking", "SPARSITY_EPS"]
