"""The `triton` backend of every fastmask op: torch.library custom ops over the kernels in `kernels/`.

Each op is two custom ops, `fastmask::<op>_fwd_triton` and `fastmask::<op>_bwd_triton`, each with a
shape-only fake implementation (so torch.compile and FakeTensor tracing see through them with no graph
break), and autograd attached once to the forward op (its backward calls the backward op, so a compiled
backward graph holds it as one node too). Plain `torch.library.custom_op` rather than `triton_op`:
the ops must also run under Triton's CPU interpreter (tests), which `wrap_triton` does not cover, and
Inductor gains nothing from looking inside these memory-bound or already-fused kernels.

Importing this module never imports triton or `fastmask.kernels`: the kernels are imported on first
call, because `triton.jit` reads TRITON_INTERPRET when a kernel module is imported (tests/conftest.py
sets it before collection; lazy imports keep a late setter working too). When triton is missing the
records still register and `available()` says why.

Index contract (checked only when FASTMASK_CHECK=1: checking syncs with the host): ids_keep rows hold
distinct patch indices and ids_restore rows are permutations of [0, L), as every mask generator makes
them. The backward kernels rely on it to write each gradient element exactly once, without atomics.

Devices: ("cuda",), plus "cpu" when TRITON_INTERPRET=1 (tests name backend="triton" on CPU tensors;
`auto` never picks triton on the CPU since the CPU priority lists do not name it).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .backends import Backend, register
from .reference import unshuffle_dtype

_DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
_LOW = (torch.float32, torch.float16, torch.bfloat16)

# Kernel limits, repeated here (not imported) so that checking them does not import triton.
MAX_TILE_ELEMS = 16384  # kernels/norm_pix_loss.py: a whole patch (padded, image order) per tile row
MAX_HEAD_DIM = 256  # kernels/attention.py: head dim padded to a power of two in one tile


def _available() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e}); pip install 'fastmask[triton]'"
    return None


# ---------------------------------------------------------------- patch_gather

@torch.library.custom_op("fastmask::patch_gather_fwd_triton", mutates_args=())
def patch_gather_fwd_triton(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    from fastmask.kernels.patch_gather import patch_gather_fwd

    return patch_gather_fwd(imgs, ids_keep, patch_size)


@patch_gather_fwd_triton.register_fake
def _(imgs, ids_keep, patch_size):
    B, C = imgs.shape[:2]
    return imgs.new_empty((B, ids_keep.shape[1], patch_size * patch_size * C))


@torch.library.custom_op("fastmask::patch_gather_bwd_triton", mutates_args=())
def patch_gather_bwd_triton(grad: torch.Tensor, ids_keep: torch.Tensor, channels: int, height: int,
                            width: int, patch_size: int) -> torch.Tensor:
    from fastmask.kernels.patch_gather import patch_gather_bwd

    return patch_gather_bwd(grad, ids_keep, channels, height, width, patch_size)


@patch_gather_bwd_triton.register_fake
def _(grad, ids_keep, channels, height, width, patch_size):
    return grad.new_empty((grad.shape[0], channels, height, width))


def _gather_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.shape, ctx.patch_size, ctx.dtype = tuple(imgs.shape), patch_size, imgs.dtype


def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    _, C, H, W = ctx.shape
    gimg = patch_gather_bwd_triton(grad, ids_keep, C, H, W, ctx.patch_size)
    return gimg.to(ctx.dtype), None, None


patch_gather_fwd_triton.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---------------------------------------------------------------- patch_scatter

@torch.library.custom_op("fastmask::patch_scatter_fwd_triton", mutates_args=())
def patch_scatter_fwd_triton(tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor
                             ) -> torch.Tensor:
    from fastmask.kernels.patch_scatter import patch_scatter_fwd

    return patch_scatter_fwd(tokens, ids_restore, mask_token.reshape(-1))


@patch_scatter_fwd_triton.register_fake
def _(tokens, ids_restore, mask_token):
    return tokens.new_empty((tokens.shape[0], ids_restore.shape[1], tokens.shape[2]))


@torch.library.custom_op("fastmask::patch_scatter_bwd_triton", mutates_args=())
def patch_scatter_bwd_triton(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmask.kernels.patch_scatter import patch_scatter_bwd

    return patch_scatter_bwd(grad, ids_restore, num_visible)


@patch_scatter_bwd_triton.register_fake
def _(grad, ids_restore, num_visible):
    B, _, D = grad.shape
    return grad.new_empty((B, num_visible, D)), grad.new_empty((D,), dtype=torch.float32)


def _scatter_setup(ctx, inputs, output):
    tokens, ids_restore, mask_token = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K, ctx.tok_dtype, ctx.mask_shape, ctx.mask_dtype = tokens.shape[1], tokens.dtype, mask_token.shape, \
        mask_token.dtype


def _scatter_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    gtok, gmask = patch_scatter_bwd_triton(grad, ids_restore, ctx.K)
    return gtok.to(ctx.tok_dtype), None, gmask.to(ctx.mask_dtype).reshape(ctx.mask_shape)


patch_scatter_fwd_triton.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# ---------------------------------------------------------------- decoder_unshuffle

@torch.library.custom_op("fastmask::decoder_unshuffle_fwd_triton", mutates_args=())
def decoder_unshuffle_fwd_triton(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                                 pos_embed: torch.Tensor) -> torch.Tensor:
    from fastmask.kernels.patch_scatter import patch_scatter_fwd

    return patch_scatter_fwd(x, ids_restore, mask_token.reshape(-1), pos_embed, cls=True,
                             out_dtype=unshuffle_dtype(x, mask_token, pos_embed))


@decoder_unshuffle_fwd_triton.register_fake
def _(x, ids_restore, mask_token, pos_embed):
    B, _, D = x.shape
    return x.new_empty((B, 1 + ids_restore.shape[1], D), dtype=unshuffle_dtype(x, mask_token, pos_embed))


@torch.library.custom_op("fastmask::decoder_unshuffle_bwd_triton", mutates_args=())
def decoder_unshuffle_bwd_triton(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                                 x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmask.kernels.patch_scatter import patch_scatter_bwd

    return patch_scatter_bwd(grad, ids_restore, num_visible, cls=True, tok_dtype=x_dtype)


@decoder_unshuffle_bwd_triton.register_fake
def _(grad, ids_restore, num_visible, x_dtype):
    B, _, D = grad.shape
    return grad.new_empty((B, 1 + num_visible, D), dtype=x_dtype), grad.new_empty((D,), dtype=torch.float32)


def _unshuffle_setup(ctx, inputs, output):
    x, ids_restore, mask_token, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K, ctx.x_dtype = x.shape[1] - 1, x.dtype
    ctx.mask_shape, ctx.mask_dtype, ctx.pos_dtype = mask_token.shape, mask_token.dtype, pos_embed.dtype


def _unshuffle_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    gx, gmask = decoder_unshuffle_bwd_triton(grad, ids_restore, ctx.K, ctx.x_dtype)
    # MAE's position embedding is a fixed buffer; a trainable one gets torch's batch sum.
    gpos = grad.sum(0).to(ctx.pos_dtype) if ctx.needs_input_grad[3] else None
    return gx, None, gmask.to(ctx.mask_dtype).reshape(ctx.mask_shape), gpos


decoder_unshuffle_fwd_triton.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


# ---------------------------------------------------------------- norm_pix_loss

@torch.library.custom_op("fastmask::norm_pix_loss_fwd_triton", mutates_args=())
def norm_pix_loss_fwd_triton(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                             norm_pix: bool) -> torch.Tensor:
    from fastmask.kernels.norm_pix_loss import norm_pix_loss_fwd

    return norm_pix_loss_fwd(pred, imgs, mask, patch_size, norm_pix)


@norm_pix_loss_fwd_triton.register_fake
def _(pred, imgs, mask, patch_size, norm_pix):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmask::norm_pix_loss_bwd_triton", mutates_args=())
def norm_pix_loss_bwd_triton(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                             patch_size: int, norm_pix: bool) -> torch.Tensor:
    from fastmask.kernels.norm_pix_loss import norm_pix_loss_bwd

    return norm_pix_loss_bwd(grad, pred, imgs, mask, patch_size, norm_pix)


@norm_pix_loss_bwd_triton.register_fake
def _(grad, pred, imgs, mask, patch_size, norm_pix):
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)


def _loss_setup(ctx, inputs, output):
    pred, imgs, mask, patch_size, norm_pix = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.patch_size, ctx.norm_pix = patch_size, norm_pix


def _loss_backward(ctx, grad):
    # Gradient with respect to pred only: the target side (imgs, mask) is data in every method.
    pred, imgs, mask = ctx.saved_tensors
    gpred = norm_pix_loss_bwd_triton(grad, pred, imgs, mask, ctx.patch_size, ctx.norm_pix)
    return gpred, None, None, None, None


norm_pix_loss_fwd_triton.register_autograd(_loss_backward, setup_context=_loss_setup)


# ---------------------------------------------------------------- attention

@torch.library.custom_op("fastmask::attention_fwd_triton", mutates_args=())
def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmask.kernels.attention import attention_fwd

    return attention_fwd(q, k, v, scale)


@attention_fwd_triton.register_fake
def _(q, k, v, scale):
    B, H, NQ, DH = q.shape
    # Same strides as the real output: a [B, H, Nq, Dh] view of a [B, Nq, H, Dh] buffer.
    return q.new_empty((B, NQ, H, DH)).transpose(1, 2), q.new_empty((B * H, NQ), dtype=torch.float32)


@torch.library.custom_op("fastmask::attention_bwd_triton", mutates_args=())
def attention_bwd_triton(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, scale: float | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastmask.kernels.attention import attention_bwd

    return attention_bwd(grad, q, k, v, out, lse, scale)


@attention_bwd_triton.register_fake
def _(grad, q, k, v, out, lse, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd_triton(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


attention_fwd_triton.register_autograd(_attention_backward, setup_context=_attention_setup)


def _attention(q, k, v, scale=None):
    return attention_fwd_triton(q, k, v, scale)[0]


# ---------------------------------------------------------------- patch_embed_visible

def _patch_embed_visible(imgs, ids_keep, weight, bias=None, pos_embed=None):
    """Triton gather of the K visible patches, one cuBLAS GEMM, then the position rows added in the
    stream's dtype.

    Why not a Triton gather + tl.dot kernel: the GEMM (M = B*K, N = D, K = p*p*C, e.g. 12800 x 1024 x
    768 for ViT-L at batch 256) is the whole cost, and cuBLAS runs it near the matrix-unit peak with no
    tuning, where a hand-written tl.dot tile loop would need per-GPU tuning to match it. Gathering first
    costs one extra write + read of [B, K, p*p*C], a quarter of the image at mask ratio 0.75 and small
    next to the GEMM.

    Dtypes as the official AMP code: the GEMM runs in the autocast dtype, and adding the fp32 position
    embedding promotes the tokens to fp32, where the residual stream starts. The addition is one
    mixed-dtype pass (bf16 GEMM output + gathered fp32 rows of pos_embed + bias, an [L, D] sum made
    first); addmm's epilogue cannot do it, since it would round pos_embed to bf16 and its fp32-output
    form (out_dtype) has no autograd.
    """
    D = weight.shape[0]
    p = weight.shape[-1]
    patches = patch_gather_fwd_triton(imgs, ids_keep, p)
    B, K, P = patches.shape
    # conv weight [D, C, p, q] -> [D, (p, q, c)]: the patch vector is in MAE's (p, q, c) order.
    w = weight.permute(0, 2, 3, 1).reshape(D, P)
    x = patches.reshape(B * K, P)
    if pos_embed is None:
        out = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
        return out.reshape(B, K, D)
    rows = pos_embed + bias if bias is not None else pos_embed
    return torch.mm(x, w.t()).reshape(B, K, D) + F.embedding(ids_keep, rows)


# ---------------------------------------------------------------- records

def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _loss_why_not(imgs=None, patch_size=None, **_):
    if imgs is None or imgs.dim() != 4 or not isinstance(patch_size, int):
        return []
    tile = _pow2(imgs.shape[1]) * _pow2(patch_size) ** 2
    if tile > MAX_TILE_ELEMS:
        return [f"a {patch_size}x{patch_size}x{imgs.shape[1]} patch pads to {tile} tile elements > "
                f"{MAX_TILE_ELEMS} (one patch per tile row, in registers)"]
    return []


def _attention_why_not(q=None, **_):
    if q is not None and q.dim() == 4 and q.shape[-1] > MAX_HEAD_DIM:
        return [f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} (one padded tile per head)"]
    return []


def _embed_why_not(weight=None, imgs=None, **_):
    if weight is None or imgs is None:
        return []
    if weight.dtype != imgs.dtype and not torch.is_autocast_enabled(imgs.device.type):
        return [f"weight dtype {weight.dtype} != imgs dtype {imgs.dtype} outside autocast"]
    return []


# Copies are exact; sums (the mask token's gradient, the loss) differ by summation order only.
_COPY_TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
_LOSS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
# Attention: 16-bit products (P is rounded to the input dtype before P V, as in every flash kernel).
_ATTN_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
_EMBED_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}

_COMMON = dict(name="triton", devices=_DEVICES, dtypes=_LOW, available=_available)

register(Backend(op="patch_gather", fn=patch_gather_fwd_triton, key_input="imgs", tolerances=_COPY_TOL,
                 **_COMMON))
register(Backend(op="patch_scatter", fn=patch_scatter_fwd_triton, key_input="tokens", tolerances=_COPY_TOL,
                 **_COMMON))
register(Backend(op="decoder_unshuffle", fn=decoder_unshuffle_fwd_triton, key_input="x", tolerances=_COPY_TOL,
                 **_COMMON))
register(Backend(op="norm_pix_loss", fn=norm_pix_loss_fwd_triton, key_input="pred", tolerances=_LOSS_TOL,
                 why_not_extra=_loss_why_not, **_COMMON))
register(Backend(op="attention", fn=_attention, key_input="q", tolerances=_ATTN_TOL,
                 why_not_extra=_attention_why_not, **_COMMON))
register(Backend(op="patch_embed_visible", fn=_patch_embed_visible, key_input="imgs", tolerances=_EMBED_TOL,
                 why_not_extra=_embed_why_not, **_COMMON))
