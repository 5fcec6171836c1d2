"""Objectives: pure loss modules and functions, each tested alone.

    reconstruction.PixelReconstruction  MAE's normalized-pixel loss over hidden patches
    reconstruction.relaxed_reconstruction  R-MAE: masked vs full branch's reconstruction, squared
    byol.byol_loss / simsiam_loss       negative cosine (BYOL, SimSiam)
    infonce.info_nce / nt_xent          contrastive (MoCo v3, SimCLR)
    dino.DINOLoss                       DINO's centred, sharpened cross-entropy
"""
from .reconstruction import PixelReconstruction, relaxed_reconstruction

__all__ = ["PixelReconstruction", "relaxed_reconstruction"]
