"""Attention-guided masking (MST, AttMask-Low): hide the tokens the teacher attends to least.

The caller supplies per-token scores, usually the teacher's last-block class-token attention over
the patches averaged over heads (`fastmask.models.attention_probe.cls_attention`), as
`masker(B, grid, scores=a)` with a [B, L]. Low score = unimportant background = hidden first, so
the foreground the representation needs is never destroyed (MST's principle).

Two forms:
- mode="exact" (any objective, MAE included): exactly L - K tokens hidden, K = int(L * (1 - r));
  they are drawn uniformly from the `candidate_ratio` * L lowest-scoring tokens (candidate_ratio
  None = mask_ratio: the L - K lowest, deterministic given the scores). Returns full `Masks`.
- mode="bernoulli" (MST's text, "mask with a probability"): each of the `candidate_ratio` * L
  lowest-scoring tokens is hidden independently with probability `prob`; the count varies per
  sample, so only `mask` is meaningful and ids_keep / ids_restore are None: for methods that
  replace hidden tokens by a mask token (MST), not for visible-only encoders.
"""
from __future__ import annotations

import torch

from ..draws import Draws, as_draws
from .base import MaskGenerator, Masks, check_ratio, grid_length, masks_from_shuffle, register_masker


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """scores [B, L] -> rank [B, L] int64 of each token in ascending score order (0 = lowest)."""
    return torch.argsort(torch.argsort(scores.detach(), dim=1, stable=True), dim=1)


@register_masker("attention")
class AttentionGuidedMasking(MaskGenerator):
    """forward(batch_size B, grid, draws | generator, scores=[B, L]) -> Masks (1 = hidden).

    mode "exact": mask_ratio r, candidate_ratio c in [r, 1] (None = r). mode "bernoulli": candidate
    ratio rho = candidate_ratio (None = 0.5), probability `prob` (MST [unverified] defaults rho 0.5, p 0.3).
    """

    def __init__(self, mask_ratio: float = 0.75, mode: str = "exact", candidate_ratio: float | None = None,
                 prob: float = 0.3):
        super().__init__()
        problems = []
        if mode not in ("exact", "bernoulli"):
            problems.append(f"mode must be 'exact' or 'bernoulli', got {mode!r}")
        if candidate_ratio is not None and not 0.0 < candidate_ratio <= 1.0:
            problems.append(f"candidate_ratio must be in (0, 1], got {candidate_ratio}")
        if mode == "exact" and candidate_ratio is not None and candidate_ratio < mask_ratio:
            problems.append(f"candidate_ratio {candidate_ratio} < mask_ratio {mask_ratio}: too few "
                            "candidates")
        if not 0.0 <= prob <= 1.0:
            problems.append(f"prob must be in [0, 1], got {prob}")
        if problems:
            raise ValueError("attention-guided masking: " + "; ".join(problems))
        self.mask_ratio = check_ratio(mask_ratio, "attention-guided masking")
        self.mode, self.prob = mode, prob
        self.candidate_ratio = candidate_ratio if candidate_ratio is not None else (
            self.mask_ratio if mode == "exact" else 0.5)

    def forward(self, batch_size: int, grid: int | tuple[int, int], device: torch.device | str | None = None,
                generator: torch.Generator | None = None, draws: Draws | None = None,
                scores: torch.Tensor | None = None, **context) -> Masks:
        L = grid_length(grid)
        if scores is None or scores.dim() != 2 or tuple(scores.shape) != (batch_size, L):
            got = None if scores is None else tuple(scores.shape)
            raise ValueError(f"attention-guided masking needs scores=[B, L] = {(batch_size, L)}, got {got}")
        device = scores.device
        if generator is not None and generator.device.type != torch.device(device).type:
            raise ValueError(f"generator on {generator.device} but scores on {device}")
        rank = _ranks(scores)
        noise = as_draws(batch_size, draws, generator, device,
                         "attention-guided masking").uniform(L).to(device)
        C = max(1, int(round(self.candidate_ratio * L)))
        candidate = rank < C
        if self.mode == "bernoulli":
            mask = (candidate & (noise < self.prob)).float()
            return Masks(None, None, mask)
        K = int(L * (1 - self.mask_ratio))
        if K < 1:
            raise ValueError(f"attention-guided masking: mask_ratio {self.mask_ratio} keeps no patch of "
                             f"L={L}")
        # Key: candidates get a random key in [0, 1), the rest 1 + rank / L; the L - K smallest keys
        # are hidden. Sorting descending puts the kept tokens first (MAE's shuffle layout).
        key = torch.where(candidate, noise, 1.0 + rank.float() / L)
        return masks_from_shuffle(torch.argsort(key, dim=1, descending=True, stable=True), K)

    def extra_repr(self) -> str:
        extra = f", prob={self.prob}" if self.mode == "bernoulli" else ""
        return (f"mode={self.mode}, mask_ratio={self.mask_ratio}, "
                f"candidate_ratio={self.candidate_ratio}{extra}")
