"""Where the elements of an image patch live, for the kernels that read patches straight from images
(patch_gather, norm_pix_loss). Device-side helper only; nothing here launches a kernel.

A patch vector has P = p*p*C elements in MAE's (p, q, c) order: element (i*p + j)*C + c is channel c of
pixel (i, j). The kernels walk patches in image order instead, as 3-D tiles [rows, CP*PI, PI]: axis 1
is (channel c, pixel row i) = divmod(cr, PI), axis 2 the pixel column j, with PI = next_pow2(p) and
CP = next_pow2(C) (tile sizes must be powers of two; the padding is masked). Along the last axis the
image offsets then run over p contiguous pixels of one row of one channel plane, which the compiler
turns into vector accesses (p = 16, bf16, 16-byte aligned rows: ld.global.v4, 8 pixels per access; 14 in
bf16: 4-byte accesses), where channel-fastest order made every image access a lone 2-byte scalar three
planes away from its neighbour. (A flat tile with e // PP and e % PP index math loses that: Triton's
contiguity analysis does not see through the divisions.) The patch-vector side is strided by C instead:
a patch vector is one contiguous range, so its accesses still fill whole sectors together. C and p are
compile-time constants (tl.constexpr), so the divisions below are shifts and multiplies.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import next_pow2


def patch_tile(C: int, p: int) -> tuple[int, int]:
    """(CP*PI, PI): the extents of axes 1 and 2 of a patch's image-order tile."""
    pi = next_pow2(p)
    return next_pow2(C) * pi, pi


@triton.jit
def patch_offsets(cr, b, l, w, s_ib, s_ic, s_ih, s_iw, C: tl.constexpr, p: tl.constexpr, PI: tl.constexpr):
    """Tile rows cr [E] (= c*PI + i) of the patches at grid cells l [R] (row-major over w patches per
    image row) of images b [R] -> (image offsets [R, E, PI], offsets in the (p, q, c) patch vector [E, PI],
    element exists [E, PI])."""
    c = cr // PI
    i = cr % PI
    j = tl.arange(0, PI)
    hi = l // w
    wi = l % w
    img = ((b * s_ib + hi * p * s_ih + wi * p * s_iw)[:, None, None] + (c * s_ic + i * s_ih)[None, :, None]
           + (j * s_iw)[None, None, :])
    vec = (i[:, None] * p + j[None, :]) * C + c[:, None]
    return img, vec, ((c < C) & (i < p))[:, None] & (j < p)[None, :]
