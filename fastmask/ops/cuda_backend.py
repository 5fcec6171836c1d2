"""The `cuda` backend of patch_gather, patch_scatter and norm_pix_loss: the native kernels in csrc/.

The CUDA extension `fastmask._C` registers six operators, `torch.ops.fastmask_cuda.<op>_fwd` and
`<op>_bwd`, with CUDA kernels only (csrc/bindings.cpp validates inputs with TORCH_CHECK). This module
adds what the C++ side does not: a shape-only fake implementation of each (so torch.compile and
FakeTensor tracing see through them without a graph break) and autograd on each forward op (its
backward calls the matching backward op, so a compiled backward graph holds it as one node). The
namespace is `fastmask_cuda`, apart from the Triton backend's `fastmask::*_triton` custom ops.

Importing this module never fails: when fastmask._C is not built (the default `pip install -e .`
builds nothing; see setup.py) or no GPU is visible, the records still register and `available()`
returns the reason, so `backend="auto"` passes over them and `backend="cuda"` raises
`BackendUnavailable` with that reason. The extension is imported, and the Python side attached, once,
on the first `available()` call.

Input preparation happens here, outside the operators, so autograd sees it: contiguous inputs,
int64 indices, a float32 mask for the loss, imgs in pred's dtype or fp32.
"""
from __future__ import annotations

import torch

from .backends import Backend, register

NAMESPACE = "fastmask_cuda"
# csrc/ops.h kNormPixMaxPatchElems: one warp stages an fp32 patch in 47 KiB of shared memory.
MAX_PATCH_ELEMS = 47 * 1024 // 4
_LOW = (torch.float32, torch.float16, torch.bfloat16)
BUILD_HINT = ("build it with `FASTMASK_BUILD_CUDA=1 pip install -e . --no-build-isolation` "
              "(needs nvcc and a CUDA torch)")


_state: dict = {}  # "reason": why fastmask._C cannot be used (None: loaded), set on the first call


def _extension_reason() -> str | None:
    """Import fastmask._C once and attach the fake and autograd registrations; why not, else None.

    A plain module-level cache rather than functools.lru_cache: Dynamo ignores lru_cache wrappers and
    would re-run the import inside a compiled region (a graph break under fullgraph=True).
    """
    if "reason" not in _state:
        try:
            import fastmask._C  # noqa: F401  (importing it registers torch.ops.fastmask_cuda.*)
        except ImportError as e:  # not built, or built against another torch (undefined symbol)
            _state["reason"] = f"the CUDA extension fastmask._C is not importable ({e}); {BUILD_HINT}"
        else:
            _register_python_side()
            _state["reason"] = None
    return _state["reason"]


@torch.compiler.assume_constant_result
def _available() -> str | None:
    # assume_constant_result: under torch.compile this runs eagerly once and its answer is a constant,
    # so backend selection inside a compiled model adds no graph break and no guard on the import.
    reasons = []
    ext = _extension_reason()
    if ext:
        reasons.append(ext)
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    return "; ".join(reasons) or None


def _ops():
    return getattr(torch.ops, NAMESPACE)


# ---------------------------------------------------------------- fakes and autograd

def _register_python_side() -> None:
    lib = f"{NAMESPACE}::"
    fake = torch.library.register_fake

    @fake(lib + "patch_gather_fwd")
    def _(imgs, ids_keep, patch_size):
        B, C = imgs.shape[:2]
        return imgs.new_empty((B, ids_keep.shape[1], patch_size * patch_size * C))

    @fake(lib + "patch_gather_bwd")
    def _(grad, ids_keep, patch_size, channels, height, width):
        return grad.new_empty((grad.shape[0], channels, height, width))

    @fake(lib + "patch_scatter_fwd")
    def _(tokens, ids_restore, mask_token):
        return tokens.new_empty((tokens.shape[0], ids_restore.shape[1], tokens.shape[2]))

    @fake(lib + "patch_scatter_bwd")
    def _(grad, ids_restore, num_kept):
        B, _, D = grad.shape
        return grad.new_empty((B, num_kept, D)), grad.new_empty((D,), dtype=torch.float32)

    @fake(lib + "norm_pix_loss_fwd")
    def _(pred, imgs, mask, patch_size, norm_pix):
        return pred.new_empty((), dtype=torch.float32)

    @fake(lib + "norm_pix_loss_bwd")
    def _(grad_loss, pred, imgs, mask, patch_size, norm_pix):
        return torch.empty_like(pred)

    torch.library.register_autograd(lib + "patch_gather_fwd", _gather_backward, setup_context=_gather_setup)
    torch.library.register_autograd(lib + "patch_scatter_fwd", _scatter_backward,
                                    setup_context=_scatter_setup)
    torch.library.register_autograd(lib + "norm_pix_loss_fwd", _loss_backward, setup_context=_loss_setup)


def _gather_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.shape, ctx.patch_size = tuple(imgs.shape), patch_size


def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    _, C, H, W = ctx.shape
    return _ops().patch_gather_bwd(grad.contiguous(), ids_keep, ctx.patch_size, C, H, W), None, None


def _scatter_setup(ctx, inputs, output):
    tokens, ids_restore, mask_token = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_kept, ctx.mask_dtype = tokens.shape[1], mask_token.dtype


def _scatter_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    gtok, gmask = _ops().patch_scatter_bwd(grad.contiguous(), ids_restore, ctx.num_kept)
    # gmask is an fp32 sum over B * (L - K) rows; cast once, to the parameter's own dtype.
    return gtok, None, gmask.to(ctx.mask_dtype)


def _loss_setup(ctx, inputs, output):
    pred, imgs, mask, patch_size, norm_pix = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.patch_size, ctx.norm_pix = patch_size, norm_pix


def _loss_backward(ctx, grad):
    # Gradient with respect to pred only: the target side (imgs, mask) is data in every method.
    pred, imgs, mask = ctx.saved_tensors
    gpred = _ops().norm_pix_loss_bwd(grad.float().contiguous(), pred, imgs, mask, ctx.patch_size,
                                     ctx.norm_pix)
    return gpred, None, None, None, None


# ---------------------------------------------------------------- backend functions

def _patch_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    return _ops().patch_gather_fwd(imgs.contiguous(), ids_keep.to(torch.int64).contiguous(), patch_size)


def _patch_scatter(tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    # mask_token may be in another dtype (an fp32 parameter beside bf16 tokens): the op casts it.
    return _ops().patch_scatter_fwd(tokens.contiguous(), ids_restore.to(torch.int64).contiguous(),
                                    mask_token.reshape(-1).contiguous())


def _norm_pix_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                   norm_pix: bool = True) -> torch.Tensor:
    # The kernels read imgs in pred's dtype or in fp32 (fp32 images beside a bf16 decoder under autocast
    # is the common case); anything else is widened to fp32, never narrowed.
    if imgs.dtype != pred.dtype:
        imgs = imgs.float()
    return _ops().norm_pix_loss_fwd(pred.contiguous(), imgs.contiguous(), mask.to(torch.float32).contiguous(),
                                    patch_size, norm_pix)


# ---------------------------------------------------------------- records

def _image_why_not(imgs=None, patch_size=None, **_):
    reasons = []
    if imgs is not None and imgs.dim() == 4:
        if imgs[0].numel() >= 2 ** 31:
            reasons.append(f"one image has {imgs[0].numel()} elements "
                           "(>= 2^31, 32-bit offsets within an image)")
        if isinstance(patch_size, int) and patch_size * imgs.shape[1] * imgs.element_size() > 48 * 1024:
            reasons.append(f"a patch row of p*C = {patch_size * imgs.shape[1]} elements "
                           "exceeds 48 KiB of shared memory")
    return reasons


def _loss_why_not(pred=None, imgs=None, **_):
    reasons = _image_why_not(imgs=imgs)  # the loss stages whole patches: its limit is the one below
    if pred is not None and pred.dim() == 3 and pred.shape[-1] > MAX_PATCH_ELEMS:
        reasons.append(f"patch vector of {pred.shape[-1]} elements > {MAX_PATCH_ELEMS} "
                       "(one warp stages a patch in 47 KiB of shared memory)")
    return reasons


# Copies are exact; the mask token's gradient and the loss differ from the reference by summation
# order only (fp32 accumulation in both), the 16-bit gradients by one rounding of the result.
_COPY_TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
_LOSS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}

_COMMON = dict(name="cuda", devices=("cuda",), dtypes=_LOW, available=_available)

register(Backend(op="patch_gather", fn=_patch_gather, key_input="imgs", tolerances=_COPY_TOL,
                 why_not_extra=_image_why_not, **_COMMON))
register(Backend(op="patch_scatter", fn=_patch_scatter, key_input="tokens", tolerances=_COPY_TOL, **_COMMON))
register(Backend(op="norm_pix_loss", fn=_norm_pix_loss, key_input="pred", tolerances=_LOSS_TOL,
                 why_not_extra=_loss_why_not, **_COMMON))
