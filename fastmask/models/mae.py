"""MaskedAutoencoderViT: the official MAE model's layout, encoder and decoder at the top level.

Its state dict has exactly the keys of facebookresearch/mae `models_mae.MaskedAutoencoderViT`
(patch_embed, cls_token, pos_embed, blocks, norm, decoder_embed, mask_token, decoder_pos_embed,
decoder_blocks, decoder_norm, decoder_pred), so official checkpoints load with `load_state_dict`.
It is a `VisionTransformer` (the encoder's methods work on it) plus `MAEDecoderLayers`.
"""
from __future__ import annotations

import torch

from .mae_decoder import MAEDecoderLayers
from .vit import VisionTransformer, vit_config


class MaskedAutoencoderViT(MAEDecoderLayers, VisionTransformer):
    """Encoder kwargs as VisionTransformer, plus decoder_embed_dim=512, decoder_depth=8,
    decoder_num_heads=16 (MAE's decoder for every size).

    forward_encoder(imgs [B, C, H, W], ids_keep [B, K]) -> latent [B, 1+K, D]
    forward_decoder(latent, ids_restore [B, L])          -> pred [B, L, p*p*C]
    """

    def __init__(self, decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 **encoder_kwargs):
        VisionTransformer.__init__(self, **encoder_kwargs)
        self._build_decoder(self.grid_size, self.patch_size, self.in_chans, self.embed_dim, decoder_embed_dim,
                            decoder_depth, decoder_num_heads, backend=self.backend)
        self._init_decoder()

    @classmethod
    def from_name(cls, model: str, **kwargs) -> "MaskedAutoencoderViT":
        """model: a registered ViT name ("vit_large_patch16"); kwargs: img_size, backend, decoder_*, ..."""
        return cls(**{**vit_config(model), **kwargs})

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.decoder_grad_checkpointing = bool(enable)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W], ids_keep [B, K] -> latent [B, 1+K, D] (visible patches only)."""
        return self.forward_visible(imgs, ids_keep)

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W], ids_keep [B, K], ids_restore [B, L] -> pred [B, L, p*p*C]."""
        return self.forward_decoder(self.forward_encoder(imgs, ids_keep), ids_restore)
