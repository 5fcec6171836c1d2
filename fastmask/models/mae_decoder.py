"""MAE's lightweight decoder, with the official parameter names.

State dict keys: `decoder_embed`, `mask_token` [1, 1, Dd], `decoder_pos_embed` [1, 1+L, Dd] (fixed
sin-cos, requires_grad False), `decoder_blocks.N.*`, `decoder_norm`, `decoder_pred`.

The layers live in `MAEDecoderLayers`, a mixin, so that `MAEDecoder` (a standalone module) and
`fastmask.models.mae.MaskedAutoencoderViT` (encoder and decoder at the top level, as the official
`MaskedAutoencoderViT`) share one implementation.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .blocks import Block, LayerNorm, init_mae_weights, run_blocks, to_2tuple
from .pos_embed import sincos_2d


class MAEDecoderLayers:
    """Mixin for an nn.Module: `_build_decoder(...)` creates the decoder's parameters on `self`,
    `forward_decoder(latent, ids_restore)` runs them."""

    def _build_decoder(self, grid_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int,
                       decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                       mlp_ratio: float = 4.0, backend: str = "auto") -> None:
        if decoder_embed_dim % 4:
            raise ValueError("decoder_embed_dim must be a multiple of 4 for the sin-cos embedding, got "
                             f"{decoder_embed_dim}")
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {decoder_embed_dim} is not divisible by decoder_num_heads "
                             f"{decoder_num_heads}")
        self.decoder_grid_size = to_2tuple(grid_size)
        self.decoder_embed_dim, self.decoder_backend = decoder_embed_dim, backend
        self.decoder_grad_checkpointing = False
        num_patches = self.decoder_grid_size[0] * self.decoder_grid_size[1]
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm,
                  backend=backend)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans, bias=True)

    def _init_decoder(self) -> None:
        """MAE's init: sin-cos decoder_pos_embed (zero cls row), mask token normal(0.02), xavier Linears."""
        with torch.no_grad():
            self.decoder_pos_embed.copy_(sincos_2d(self.decoder_embed_dim, self.decoder_grid_size,
                                                   cls_token=True,
                                                   device=self.decoder_pos_embed.device).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_mae_weights)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+K, D] (cls + visible tokens in the encoder's order), ids_restore [B, L] int64
        -> pred [B, L, p*p*C], one pixel vector per patch in image order ((p, q, c) order inside).

        Embed to the decoder width; put the visible tokens back in image order with the mask token at
        every hidden place, the cls token in front and the fixed position embedding added, in one op
        (`fastmask.ops.decoder_unshuffle`; its output is fp32 under autocast, as the official code's
        decoder stream); run the blocks, norm, predict, drop cls.
        """
        L = self.decoder_pos_embed.shape[1] - 1
        if latent.dim() != 3 or ids_restore.dim() != 2 or ids_restore.shape != (latent.shape[0], L):
            raise ValueError(f"latent must be [B, 1+K, D] and ids_restore [B, L={L}], got "
                             f"{tuple(latent.shape)} and {tuple(ids_restore.shape)}")
        x = ops.decoder_unshuffle(self.decoder_embed(latent), ids_restore, self.mask_token.reshape(-1),
                                  self.decoder_pos_embed[0], backend=self.decoder_backend)
        x = run_blocks(self.decoder_blocks, x, self.decoder_grad_checkpointing, self.decoder_norm,
                       self.decoder_backend)
        return self.decoder_pred(x)[:, 1:]


class MAEDecoder(MAEDecoderLayers, nn.Module):
    """Standalone MAE decoder: forward(latent [B, 1+K, D], ids_restore [B, L]) -> pred [B, L, p*p*C].

    Args: grid_size (h, w) of the patch grid, patch_size, in_chans, embed_dim (the encoder's width),
    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, backend.
    """

    def __init__(self, grid_size: int | tuple[int, int], patch_size: int, in_chans: int = 3,
                 embed_dim: int = 768,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, backend: str = "auto"):
        nn.Module.__init__(self)
        self._build_decoder(grid_size, patch_size, in_chans, embed_dim, decoder_embed_dim, decoder_depth,
                            decoder_num_heads, mlp_ratio, backend)
        self._init_decoder()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.decoder_grad_checkpointing = bool(enable)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return self.forward_decoder(latent, ids_restore)
