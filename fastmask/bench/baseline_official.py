"""The official MAE training step, as facebookresearch/mae's own code runs it, independent of fastmask.

Written from the spec (docs/methods.md, MAE; the official `models_mae.py`, `engine_pretrain.py`,
`util/misc.py`, `util/lr_sched.py`), deliberately without any fastmask model, op or kernel, so it can
serve as the oracle of the loss-parity test and as the `official` row of `fastmask bench`:

- the model (`OfficialMAE`): Conv2d patch embedding of ALL L patches, fixed 2-D sin-cos positions
  added, `torch.gather` of the visible tokens (argsort of uniform noise, `random_masking`);
  timm-0.3-style pre-LN blocks with eager attention (`q @ k^T`, explicit softmax, `@ v`); the decoder
  appends mask tokens, unshuffles with `torch.gather`, runs its blocks on L + 1 tokens; the loss
  patchifies the whole image, normalizes every patch, takes the squared error on all L patches and
  only then masks it. Parameter names and state-dict keys are the official ones, so a fastmask MAE's
  `official_state_dict()` loads into it unchanged (and back);
- the step (`make_official_step`): the lr written into every param group per iteration (warmup +
  half-cycle cosine, `official_lr`), the forward under AMP autocast of the run's dtype, `loss.item()`
  and the finite check on the host, the loss scaler's backward, unscale_ and per-step gradient norm
  (`get_grad_norm_`: one norm per parameter, computed and returned every step although pretraining
  never uses it), `optimizer.step()`, `zero_grad()`, `torch.cuda.synchronize()`. GradScaler is on for
  fp16 only (bf16 and fp32 need none). The optimizer is torch's AdamW with torch's default
  implementation for the device (for-each on CUDA, the for-loop one on the CPU) over timm's
  `add_weight_decay` groups (no decay for 1-D parameters and biases; cls and mask tokens ARE decayed).

The keyword knobs of `make_official_step` (host_sync, grad_norm, optimizer) exist for the ablation
(`fastmask.bench.ablate`), which removes one of them per row; their defaults are the official code.
`block=` swaps the transformer block (the strong baseline, `fastmask.bench.baseline_strong`, passes
timm's SDPA block), and `all_tokens=True` gives the MAE paper's ablation: the encoder sees every
token, with a learned mask token in place of each hidden patch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

BlockFactory = Callable[[int, int, float], nn.Module]  # (dim, num_heads, mlp_ratio) -> block


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """-> [1, (1 +) grid*grid, dim] fixed 2-D sin-cos positions; the cls row is zeros.

    Half the channels encode the column, half the row; within each half, sin then cos of
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


class Attention(nn.Module):
    """timm 0.3's attention: qkv projection, explicit q @ k^T * scale, softmax, @ v, projection."""

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


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm 0.3's pre-LN block (as the official code imports it): x + attn(norm1(x)), + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """imgs [B, C, H, W] -> [B, L, D]: a Conv2d (kernel = stride = p) over every patch (timm's `proj`)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)


class OfficialMAE(nn.Module):
    """forward(imgs [B, C, H, W], mask_ratio, noise [B, L] | None) -> (loss fp32 scalar, pred [B, L, p*p*C],
    mask [B, L]). Mask convention: 1 = hidden, 0 = visible.

    noise: the uniform noise `random_masking` argsorts (the smallest are kept, in that order); None
    draws it with torch.rand as the official code. Passing it (as Hugging Face's ViTMAE allows) lets a
    test drive this model with another implementation's masks.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = True,
                 all_tokens: bool = False, block: BlockFactory = Block):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.in_chans, self.grid = patch_size, in_chans, img_size // patch_size
        self.norm_pix_loss, self.all_tokens = norm_pix_loss, all_tokens
        self.num_patches = L = self.grid ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos positions: Parameters with requires_grad False, as the official code.
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        # Only the all-token ablation has it: the mask token that enters the encoder.
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if all_tokens else None
        self.blocks = nn.ModuleList(block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid, True))
            dec = self.decoder_pos_embed
            dec.copy_(sincos_pos_embed_2d(dec.shape[-1], self.grid, True))
        w = self.patch_embed.proj.weight.data
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

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """x [B, L, D] -> (visible [B, K, D], mask [B, L], ids_restore [B, L]); K = int(L*(1-r))."""
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        visible, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
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

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm 0.3's `add_weight_decay` as the official code calls it (no skip list): no decay for 1-D
    parameters and biases; frozen tensors (the sin-cos positions) left out; tokens [1, 1, D] decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def official_lr(it: int, total_its: int, base_lr: float, warmup_its: int = 0, min_lr: float = 0.0) -> float:
    """`util/lr_sched.adjust_learning_rate` in iteration units: linear warmup from 0, then half-cycle
    cosine from base_lr down to min_lr at the last iteration."""
    if it < warmup_its:
        return base_lr * it / warmup_its
    progress = (it - warmup_its) / max(1, total_its - warmup_its)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def get_grad_norm_(parameters, norm_type: float = 2.0) -> torch.Tensor:
    """The official `util/misc.get_grad_norm_`: the norm of the per-parameter gradient norms."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.norm(torch.stack([torch.norm(g, norm_type) for g in grads]), norm_type)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], impl: str) -> torch.optim.Optimizer:
    """torch AdamW; impl "default": torch's own choice for the device (for-each on CUDA, for-loop on
    the CPU), "fused": the fused kernel (for-each where this torch has no fused kernel for the device)."""
    if impl == "default":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if impl != "fused":
        raise ValueError(f"optimizer must be default|fused, got {impl!r}")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def make_official_step(model: OfficialMAE, dtype: torch.dtype, mask_ratio: float = 0.75, lr: float = 1.5e-4,
                       weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                       lr_schedule: Callable[[int], float] | None = None, *, host_sync: bool = True,
                       grad_norm: bool = True, optimizer: str = "default") -> Callable:
    """-> step(imgs [B, C, H, W], noise [B, L] | None = None) -> the loss (detached tensor): one
    iteration of the official `train_one_epoch` (module docstring), accum_iter 1.

    lr_schedule(iteration) -> lr sets every group's lr before each step (`official_lr` gives the
    official schedule); None keeps `lr`. dtype: fp32 runs without autocast; bf16/fp16 run the forward
    under autocast (GradScaler for fp16). host_sync=False drops `loss.item()`, the finite check and
    `torch.cuda.synchronize()`; grad_norm=False drops the unused per-step gradient norm;
    optimizer="fused" takes torch's fused AdamW (see `adamw`).
    """
    device = next(model.parameters()).device
    opt = adamw(official_param_groups(model, weight_decay), lr, betas, optimizer)
    amp = dtype in (torch.bfloat16, torch.float16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    it = [0]

    def step(imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if lr_schedule is not None:
            lr_now = lr_schedule(it[0])
            for g in opt.param_groups:
                g["lr"] = lr_now * g.get("lr_scale", 1.0)
        it[0] += 1
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss, _, _ = model(imgs, mask_ratio, noise)
        if host_sync:
            loss_value = loss.item()  # the official loop checks the loss on the host every step
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"official baseline: loss is {loss_value}")
        scaler.scale(loss).backward()
        if grad_norm:
            scaler.unscale_(opt)
            get_grad_norm_(params)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if host_sync and device.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def official_forward(model: OfficialMAE, dtype: torch.dtype, mask_ratio: float = 0.75) -> Callable:
    """-> forward(imgs) -> loss under the same autocast as `make_official_step` (for memory probes)."""
    device = next(model.parameters()).device
    amp = dtype in (torch.bfloat16, torch.float16)

    def forward(imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return model(imgs, mask_ratio)[0]

    return forward
