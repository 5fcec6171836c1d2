"""Transformer layers with timm's parameter names, shared by every model in fastmask.

Names follow timm (and therefore the official MAE code, which builds on timm's Block): a state dict
of `Block` has `norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2` (and `ls1.gamma`,
`ls2.gamma` only when layer scale is on), `PatchEmbed` has `proj` (a Conv2d). Attention is
`fastmask.ops.nn.Attention`, so the product runs through the fused attention op.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .. import ops
from ..ops.nn import Attention

# MAE (and timm's ViTs) use LayerNorm with eps 1e-6 everywhere.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair (H, W), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


class PatchConv(nn.Conv2d):
    """The patch-embedding Conv2d (kernel = stride = p) that can also embed only some patches.

    forward(imgs [B, C, H, W]) -> [B, D, H/p, W/p] (a plain conv);
    forward(imgs, ids_keep [B, K], pos_embed [L, D] | None) -> [B, K, D]: the kept patches only
    (plus their position embedding), through `fastmask.ops.patch_embed_visible`: the patches are
    cut in MAE's (p, q, c) order and embedded by one matmul with the conv weight permuted to the
    same order, equal to the conv followed by a gather without embedding the hidden patches.
    Both paths run inside this module's forward, so wrappers that materialize a module's
    parameters around its forward (DeepSpeed ZeRO-3) see the weight used.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, backend: str = "auto"):
        super().__init__(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_size, self.backend = patch_size, backend

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None,
                pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        if ids_keep is None:
            return super().forward(imgs)
        # gather + matmul (+ bias + pos_embed) in one op; its fused backends never cut out hidden patches
        return ops.patch_embed_visible(imgs, ids_keep, self.weight, self.bias, pos_embed,
                                       backend=self.backend)


class PatchEmbed(nn.Module):
    """imgs [B, C, H, W] -> tokens [B, L, D], L = (H/p)*(W/p) in row-major patch order;
    with ids_keep [B, K]: the kept patches' tokens only, [B, K, D] in ids_keep's order;
    pos_embed [L, D] (optional) is added at each token's patch.

    `proj` (timm's name) is a Conv2d with kernel = stride = p. `img_size` fixes the grid the
    position embeddings are built for; the owning model checks inputs against it.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, backend: str = "auto"):
        super().__init__()
        H, W = to_2tuple(img_size)
        problems = []
        if not isinstance(patch_size, int) or patch_size <= 0:
            problems.append(f"patch_size must be a positive int, got {patch_size!r}")
        elif H % patch_size or W % patch_size or H <= 0 or W <= 0:
            problems.append(f"img_size {H}x{W} is not divisible by patch size {patch_size}")
        if problems:
            raise ValueError("; ".join(problems))
        self.img_size, self.patch_size, self.in_chans = (H, W), patch_size, in_chans
        self.grid_size = (H // patch_size, W // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = PatchConv(in_chans, embed_dim, patch_size, backend=backend)

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None,
                pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        if ids_keep is not None:
            return self.proj(imgs, ids_keep, pos_embed)
        x = self.proj(imgs).flatten(2).transpose(1, 2)
        return x if pos_embed is None else x + pos_embed


class Mlp(nn.Module):
    """x [..., in] -> [..., out]: fc1, GELU, fc2 (timm names)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, bias: bool = True):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (drop the residual branch of whole samples with probability p)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """x * gamma, gamma [D] initialised to `init_values` (CaiT; timm's `ls1.gamma`)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN transformer block, x [B, N, D] -> [B, N, D]:
    x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), each residual branch under drop-path.

    timm's Block and its parameter names; `backend` picks the fastmask.ops attention backend.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, init_values: float | None = None, norm_layer=LayerNorm,
                 backend: str = "auto"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, backend=backend)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def init_mae_weights(module: nn.Module) -> None:
    """MAE's init for one module (use with `model.apply`): xavier-uniform Linear weights with zero
    bias (as the official JAX ViT), LayerNorm weight 1 / bias 0. Patch-embed and tokens are
    initialised by their owners (see `VisionTransformer.init_weights`)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _plain_gelu_mlp(blk: "Block") -> bool:
    act = blk.mlp.act
    return isinstance(act, nn.GELU) and act.approximate == "none" and blk.mlp.fc1.bias is not None


def fused_chain_backend(blocks: nn.ModuleList, x: torch.Tensor, final_norm: nn.Module | None,
                        backend: str) -> str | None:
    """The add_layer_norm backend the fused chain would use for `x`, or None when the chain should not
    run: no final norm to end it on, blocks that are not plain pre-LN GELU blocks, or `auto` landing
    on the reference (then the eager per-block path is the same math with fewer Python calls)."""
    if final_norm is None or len(blocks) == 0 or not isinstance(final_norm, nn.LayerNorm):
        return None
    if not all(isinstance(b, Block) and _plain_gelu_mlp(b) for b in blocks):
        return None
    n = final_norm
    name = ops.select("add_layer_norm", backend, x=x, residual=x, weight=n.weight, bias=n.bias).name
    return None if name == "torch" else name


def _add_norm(a: torch.Tensor, h: torch.Tensor | None, norm: nn.LayerNorm, backend: str):
    return ops.add_layer_norm(a, h, norm.weight, norm.bias, norm.eps, backend=backend)


def fc1_bias_gelu(mlp: nn.Module, y: torch.Tensor, backend: str) -> torch.Tensor:
    """GELU(fc1(y)) with fc1's bias added inside the fused bias_gelu (the matmul runs without it)."""
    return ops.bias_gelu(torch.nn.functional.linear(y, mlp.fc1.weight), mlp.fc1.bias, backend=backend)


def gelu_mlp(mlp: nn.Module, y: torch.Tensor, backend: str) -> torch.Tensor:
    """fc2(GELU(fc1(y))) of an MLP with timm's names, fc1's bias fused with the GELU."""
    return mlp.fc2(fc1_bias_gelu(mlp, y, backend))


def _fused_block(blk, y: torch.Tensor, h: torch.Tensor, next_norm: nn.LayerNorm | None, backend: str, mlp_fn):
    """One pre-LN block on (y = norm1(h), h) -> (next_norm(h'), h'): each residual add is fused with
    the LayerNorm that follows it; without a next norm the last add is plain and y is None."""
    a = blk.drop_path1(blk.ls1(blk.attn(y)))
    y, h = _add_norm(a, h, blk.norm2, backend)
    m = blk.drop_path2(blk.ls2(mlp_fn(blk.mlp, y, backend)))
    if next_norm is None:
        return None, h + m
    return _add_norm(m, h, next_norm, backend)


def fused_chain(blocks, x: torch.Tensor, final_norm: nn.LayerNorm | None, backend: str,
                checkpoint: bool = False, mlp_fn=gelu_mlp) -> torch.Tensor:
    """x [B, N, D] through pre-LN `blocks` with every residual add fused with the LayerNorm after it
    (the next block's norm1, or `final_norm` after the last block) -> final_norm(x') [B, N, D], or the
    residual stream x' itself when final_norm is None (the last add then runs unfused).

    Each block is read through timm's names: `norm1`, `attn` (y -> attention output), `ls1`,
    `drop_path1`, `norm2`, `mlp`, `ls2`, `drop_path2` (fastmask's Block, timm's Block, or a view of
    another library's layer). `mlp_fn(block.mlp, y, backend)` computes the MLP (default: fc1's bias
    fused with GELU). With `checkpoint` (and grad enabled), each block is recomputed in backward.
    """
    from torch.utils.checkpoint import checkpoint as ckpt

    use_ckpt = checkpoint and torch.is_grad_enabled()
    y, h = _add_norm(x, None, blocks[0].norm1, backend)
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else final_norm
        y, h = (ckpt(_fused_block, blk, y, h, nxt, backend, mlp_fn, use_reentrant=False) if use_ckpt
                else _fused_block(blk, y, h, nxt, backend, mlp_fn))
    return h if final_norm is None else y


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpoint: bool, final_norm: nn.Module | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Apply `blocks` in order, then `final_norm` when given; with `checkpoint`, recompute each block's
    activations in backward (torch.utils.checkpoint, non-reentrant so it composes with autocast and
    DeepSpeed).

    With a final norm and a fused add_layer_norm backend for `x` (Triton on CUDA; `backend="triton"`
    names it anywhere it runs), the blocks run as one `fused_chain` where every residual add is fused
    with the next LayerNorm (the next block's norm1, or `final_norm` after the last block) and fc1's
    bias with GELU: the same function with two fewer memory passes per sublayer.
    """
    from torch.utils.checkpoint import checkpoint as ckpt

    if fused_chain_backend(blocks, x, final_norm, backend) is not None:
        return fused_chain(blocks, x, final_norm, backend, checkpoint)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    for blk in blocks:
        x = ckpt(blk, x, use_reentrant=False) if use_ckpt else blk(x)
    return final_norm(x) if final_norm is not None else x
