"""Objectives: pure loss modules and functions, each tested alone.

    reconstruction.PixelReconstruction  MAE's normalized-pixel loss over hidden patches
    byol.byol_loss / simsiam_loss       negative cosine (BYOL, SimSiam)
    infonce.info_nce / nt_xent          contrastive (MoCo v3, SimCLR)
    dino.DINOLoss                       DINO's centred, sharpened cross-entropy
"""
from .reconstruction import PixelReconstruction

__all__ = ["PixelReconstruction"]
