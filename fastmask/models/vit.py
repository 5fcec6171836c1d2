"""Vision Transformer encoder with timm's and the official MAE code's parameter names.

State dict keys: `patch_embed.proj.{weight,bias}`, `cls_token` [1, 1, D], `pos_embed` [1, 1+L, D]
(fixed 2-D sin-cos, requires_grad False), `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`. A pretrained encoder therefore loads into `timm.create_model("vit_base_patch16_224",
num_classes=0)` unchanged, and the official MAE checkpoints' encoder part loads here.

Three ways in, all returning tokens after the final norm, cls first:
- `forward_features(imgs)`      -> [B, 1+L, D]  every patch (evaluation, fine-tuning);
- `forward_visible(imgs, ids)`  -> [B, 1+K, D]  only the K visible patches are embedded and encoded
                                                (MAE: no mask token ever enters the encoder);
- `forward_masked_tokens(imgs, mask, mask_token)` -> [B, 1+L, D]  hidden patches replaced by a
                                                learned token before the position embedding
                                                (SimMIM/MST style).

Images must have the `img_size` the position embedding is built for, unless `dynamic_img_size`
(timm's name): then any size divisible by the patch size is taken, the position embedding resized
bicubically to its grid (`pos_embed.resize_pos_embed`, DINO's interpolation: MST's 96 px local crops
through a ViT built for 224 px).
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model
from .blocks import Block, LayerNorm, PatchConv, PatchEmbed, init_mae_weights, run_blocks
from .pos_embed import resize_pos_embed, sincos_2d

# name -> (embed_dim, depth, num_heads); MAE's sizes (tiny/small from DeiT).
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
PATCH_SIZES = (16, 14)


class VisionTransformer(nn.Module):
    """ViT encoder. imgs [B, C, H, W] (H, W = img_size) fp32|bf16 -> tokens [B, 1+N, D], cls first.

    Args: img_size (int or (H, W), divisible by patch_size), patch_size, in_chans, embed_dim, depth,
    num_heads, mlp_ratio, qkv_bias, drop_path_rate (linearly increasing over depth, as timm),
    init_values (layer scale; None = off, as MAE), backend (fastmask.ops backend for attention and
    the patch ops), dynamic_img_size (accept other image sizes, see the module docstring). Weights use
    MAE's init.
    """

    num_prefix_tokens = 1

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, init_values: float | None = None,
                 backend: str = "auto", dynamic_img_size: bool = False):
        super().__init__()
        if embed_dim % 4:
            raise ValueError("embed_dim must be a multiple of 4 for the 2-D sin-cos embedding, got "
                             f"{embed_dim}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, backend=backend)
        self.patch_size, self.embed_dim, self.in_chans = patch_size, embed_dim, in_chans
        self.img_size, self.grid_size = self.patch_embed.img_size, self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.backend, self.dynamic_img_size = backend, bool(dynamic_img_size)
        self.grad_checkpointing = False
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos embedding: a Parameter (as the official code) so checkpoints carry it, never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  init_values=init_values, norm_layer=LayerNorm, backend=backend)
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.init_weights()

    # ------------------------------------------------------------------ init and model API
    def init_weights(self) -> None:
        """MAE's init: sin-cos pos_embed (zero cls row), xavier on the patch-embed weight viewed as
        [D, C*p*p], cls token normal(0.02), xavier/zero for Linears, 1/0 for LayerNorms."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size, cls_token=True,
                                           device=self.pos_embed.device).unsqueeze(0))
        self.patch_embed.apply(_init_patch_proj)  # a child's weights: through apply (see models/__init__)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in (self.blocks, self.norm):
            m.apply(init_mae_weights)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay (timm's convention; pos_embed is frozen anyway)."""
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint per block)."""
        self.grad_checkpointing = bool(enable)

    def check_images(self, imgs: torch.Tensor) -> None:
        """Raise one ValueError naming every problem with `imgs` for this model, before any work."""
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
            shape = tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
            raise ValueError(f"imgs must be a [B, C, H, W] tensor, got {shape}")
        problems = []
        B, C, H, W = imgs.shape
        p = self.patch_size
        if H % p or W % p:
            problems.append(f"image size {H}x{W} is not divisible by patch size {p}")
        elif (H, W) != self.img_size and not self.dynamic_img_size:
            problems.append(f"image size {H}x{W} does not match the model's img_size "
                            f"{self.img_size[0]}x{self.img_size[1]} (the position embedding is built for it)")
        if C != self.in_chans:
            problems.append(f"images have {C} channels, the model expects {self.in_chans}")
        if not imgs.is_floating_point():
            problems.append(f"imgs must be floating point, got {imgs.dtype}")
        if problems:
            raise ValueError("; ".join(problems))

    # ------------------------------------------------------------------ forwards
    def _prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        # The cls token's position embedding is pos_embed[0], the all-zero row (kept for fidelity).
        # The residual stream takes the promoted dtype, as torch.cat does in the official code: fp32 under
        # autocast (fp32 parameters beside bf16 activations), never the cls token rounded to bf16.
        dt = torch.promote_types(x.dtype, self.cls_token.dtype)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(dt).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x.to(dt)], dim=1)

    def _patch_pos(self, imgs: torch.Tensor) -> torch.Tensor:
        """-> [1, L, D]: the position embedding's patch rows for `imgs`'s grid (resized if it differs)."""
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        return resize_pos_embed(self.pos_embed, self.grid_size, grid)[:, 1:]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, self._prepend_cls(x), self.grad_checkpointing, self.norm, self.backend)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> [B, 1+L, D]: every patch, after the final norm (cls token first)."""
        self.check_images(imgs)
        x = self.patch_embed(imgs) + self._patch_pos(imgs)
        return self._encode(x)

    def embed_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W], ids_keep [B, K] int64 -> [B, K, D]: patch embedding plus position
        embedding of the kept patches only, in ids_keep's order.

        Equals `(patch_embed(imgs) + pos_embed[:, 1:]).gather(ids_keep)` (MAE embeds all L patches,
        then gathers) but embeds only K patches (`PatchConv` -> `fastmask.ops.patch_embed_visible`).
        """
        return self.patch_embed(imgs, ids_keep, self._patch_pos(imgs)[0])  # embeds only the kept patches

    def forward_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W], ids_keep [B, K] int64 (visible patches, any order) -> [B, 1+K, D].

        MAE's encoder: only the K visible patches (plus cls) run through the blocks; the output
        keeps ids_keep's order after the cls token.
        """
        self.check_images(imgs)
        return self._encode(self.embed_visible(imgs, ids_keep))

    def forward_masked_tokens(self, imgs: torch.Tensor, mask: torch.Tensor,
                              mask_token: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W], mask [B, L] (1 = hidden), mask_token [D] (or [1, 1, D]) -> [B, 1+L, D].

        Every patch enters the encoder; hidden ones are replaced by `mask_token` before the
        position embedding is added (SimMIM / MST), so the token learns "a hidden patch here".
        """
        self.check_images(imgs)
        pos = self._patch_pos(imgs)
        B, L = imgs.shape[0], pos.shape[1]
        if tuple(mask.shape) != (B, L):
            raise ValueError(f"mask must be [B, L] = {(B, L)}, got {tuple(mask.shape)}")
        if mask_token.numel() != self.embed_dim:
            raise ValueError(f"mask_token must have D={self.embed_dim} elements, got shape "
                             f"{tuple(mask_token.shape)}")
        x = self.patch_embed(imgs)
        w = mask.to(x.dtype).unsqueeze(-1)
        x = x * (1 - w) + mask_token.reshape(1, 1, -1).to(x.dtype) * w
        return self._encode(x + pos)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> [B, 1+L, D] (= forward_features; heads live in the methods/eval)."""
        return self.forward_features(imgs)

    # ------------------------------------------------------------------ sharing
    def encoder_view(self) -> "VisionTransformer":
        """A plain VisionTransformer sharing this model's encoder parameters (same tensors, no copy).

        For subclasses that carry more than the encoder (MAE's decoder): its state_dict holds only
        the encoder keys (timm-loadable), and training this model trains the view.
        """
        view = VisionTransformer.__new__(VisionTransformer)
        nn.Module.__init__(view)
        for attr in ("patch_size", "embed_dim", "in_chans", "img_size", "grid_size", "num_patches", "backend",
                     "dynamic_img_size", "grad_checkpointing"):
            setattr(view, attr, getattr(self, attr))
        for attr in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm"):
            setattr(view, attr, getattr(self, attr))
        view.train(self.training)
        return view


def _init_patch_proj(module: nn.Module) -> None:
    """MAE's patch-embed init (for `apply`): xavier-uniform on the conv weight viewed as [D, C*p*p], zero
    bias."""
    if isinstance(module, PatchConv):
        w = module.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(module.bias)


def vit_config(name: str) -> dict:
    """Registered ViT name (e.g. "vit_base_patch16") -> its architecture kwargs
    {patch_size, embed_dim, depth, num_heads}; ValueError for a name that is not a ViT."""
    parts = name.split("_")
    size = parts[1] if len(parts) == 3 and parts[0] == "vit" else None
    patch = parts[2][len("patch"):] if size else ""
    if size not in VIT_ARCHS or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        from ._registry import list_models

        vits = [m for m in list_models() if m.startswith("vit_")]
        raise ValueError(f"unknown ViT model {name!r}; available ViTs: {', '.join(vits)}")
    dim, depth, heads = VIT_ARCHS[size]
    return dict(patch_size=int(patch), embed_dim=dim, depth=depth, num_heads=heads)


def _register_vits() -> None:
    for size in VIT_ARCHS:
        for p in PATCH_SIZES:
            name = f"vit_{size}_patch{p}"

            def make(_name=name, **kwargs) -> VisionTransformer:
                return VisionTransformer(**{**vit_config(_name), **kwargs})

            make.__name__ = make.__qualname__ = name
            make.__doc__ = (f"{name}: ViT-{size[0].upper()}/{p} ({VIT_ARCHS[size][0]} wide, "
                            f"{VIT_ARCHS[size][1]} deep, {VIT_ARCHS[size][2]} heads); kwargs go to "
                            "VisionTransformer (img_size=224, ...).")
            register_model(make)


_register_vits()
