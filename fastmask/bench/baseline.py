"""The comparison point: MAE as it is usually written, in plain PyTorch, independent of fastmask.

This follows the structure of the official facebookresearch/mae `models_mae.py` and its training
loop (`engine_pretrain.py`), written here from the spec in docs/methods.md (MAE), deliberately
without any fastmask model, op or kernel:

- Conv2d patch embedding of ALL L patches, fixed 2-D sin-cos positions added, then `torch.gather`
  of the visible tokens (argsort of uniform noise, as `random_masking`);
- timm-style pre-LN blocks with eager attention (`q @ k^T`, explicit softmax, `@ v`);
- the decoder appends mask tokens, unshuffles with `torch.gather`, runs its blocks on L + 1 tokens;
- the loss patchifies the whole image, normalizes every patch, takes the squared error on all L
  patches and only then masks it;
- the step: AMP autocast on GPU (GradScaler for fp16), `loss.item()` every step (the official loop
  checks the loss on the host), unfused AdamW (`foreach=False`).

`all_tokens=True` gives the MAE paper's ablation: the encoder sees every token, with a learned
mask token in place of each hidden patch, and the decoder reads the encoder's L + 1 outputs.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """-> [1, (1 +) grid*grid, dim] fixed 2-D sin-cos positions; the cls row is zeros.

    Half the channels encode the row, half the column; within each half, sin then cos of
    position * 10000^(-2i/d), as the official `get_2d_sincos_pos_embed`.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # official: w first, then h

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([embed_1d(gx), embed_1d(gy)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


class EagerAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EagerAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BaselineMAE(nn.Module):
    """forward(imgs [B, C, H, W], mask_ratio) -> (loss fp32 scalar, pred [B, L, p*p*C], mask [B, L]).

    Mask convention: 1 = hidden, 0 = visible.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = True,
                 all_tokens: bool = False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.in_chans, self.grid = patch_size, in_chans, img_size // patch_size
        self.norm_pix_loss, self.all_tokens = norm_pix_loss, all_tokens
        L = self.grid ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid, True), persistent=False)
        # Only the ablation uses it: the mask token that enters the encoder.
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if all_tokens else None
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, self.grid, True),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.num_patches = L
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for t in (self.cls_token, self.mask_token, self.enc_mask_token):
            if t is not None:
                nn.init.normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> [B, L, p*p*C] in (row, col, channel) order."""
        B, C, H, W = imgs.shape
        p, h = self.patch_size, H // self.patch_size
        x = imgs.reshape(B, C, h, p, h, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(B, h * h, p * p * C)

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        """x [B, L, D] -> (visible [B, K, D], mask [B, L], ids_restore [B, L]); K = int(L*(1-r))."""
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        noise = torch.rand(B, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, 1:, :]
        visible, mask, ids_restore = self.random_masking(x, mask_ratio)
        if self.all_tokens:
            # Every patch stays; hidden ones are replaced by the (positioned) mask token.
            m = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - m) + (self.enc_mask_token + self.pos_embed[:, 1:, :]) * m
        else:
            x = visible
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        if not self.all_tokens:
            B, n, D = x.shape
            mask_tokens = self.mask_token.repeat(B, ids_restore.shape[1] + 1 - n, 1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
            x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # every patch, then masked
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's add_weight_decay, as the official code: no decay for 1-D parameters and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_train_step(model: BaselineMAE, dtype: torch.dtype, mask_ratio: float = 0.75, lr: float = 1.5e-4,
                    weight_decay: float = 0.05) -> Callable[[torch.Tensor], float]:
    """-> step(imgs [B, C, H, W]) doing one official-style optimizer step; returns the loss (host float).

    dtype: fp32 runs without autocast; bf16/fp16 run the forward under autocast (the official code
    uses fp16 + GradScaler; bf16 needs no scaler). The optimizer is AdamW with foreach=False.
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), foreach=False)
    amp = dtype in (torch.bfloat16, torch.float16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(imgs: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss, _, _ = model(imgs, mask_ratio)
        loss_value = loss.item()  # the official loop syncs here to check the loss
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"baseline loss is {loss_value}")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss_value

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def baseline_forward(model: BaselineMAE, dtype: torch.dtype, mask_ratio: float = 0.75):
    """-> forward(imgs) -> loss under the same autocast as `make_train_step` (for memory probes)."""
    device = next(model.parameters()).device
    amp = dtype in (torch.bfloat16, torch.float16)

    def forward(imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return model(imgs, mask_ratio)[0]

    return forward
