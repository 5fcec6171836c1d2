"""fastmask.ops.reference against independent, deliberately naive formulations.

The oracles below loop over patches / place every mask token by hand / sum losses patch by patch /
compute softmax attention explicitly in fp64, so they share no code path (no einsum, no gather)
with the reference. Outputs and gradients on random inputs, odd sizes, batch 1, fp32 and bf16;
`gradcheck` of the reference in fp64; bad inputs to every public op raise one ValueError naming
the problem. Tolerances come from the `torch` backend records.
"""
import math

import pytest
import torch

from fastmask import ops
from fastmask.ops import backends, reference

DTYPES = [torch.float32, torch.bfloat16]


def _tol(op: str, dtype: torch.dtype) -> tuple[float, float]:
    return backends.backends_for(op)["torch"].tolerances[dtype]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(sum((i + 1) * 7919 * abs(hash(k))
                                             for i, k in enumerate(key)) % (2 ** 31))


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def _perms(g, B, L):
    return torch.stack([torch.randperm(L, generator=g) for _ in range(B)])


# ------------------------------------------------------------------ naive oracles (fp64)
def naive_patchify(imgs, p):
    """Patch (i, j) of image b, cut out by slicing, laid out (row-in-patch, col-in-patch, channel)."""
    B, C, H, W = imgs.shape
    rows = []
    for b in range(B):
        patches = []
        for i in range(H // p):
            for j in range(W // p):
                patch = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [C, p, q]
                vals = [patch[c, r, s] for r in range(p) for s in range(p) for c in range(C)]
                patches.append(torch.stack(vals))
        rows.append(torch.stack(patches))
    return torch.stack(rows)


def naive_gather(imgs, ids_keep, p):
    allp = naive_patchify(imgs, p)
    return torch.stack([torch.stack([allp[b, int(i)] for i in ids_keep[b]]) for b in range(imgs.shape[0])])


def naive_scatter(tokens, ids_keep, L, mask_token):
    """Visible token k of sample b goes to patch ids_keep[b, k]; every other place gets mask_token."""
    B, K, D = tokens.shape
    out = []
    for b in range(B):
        row = [mask_token.reshape(D)] * L
        for k in range(K):
            row[int(ids_keep[b, k])] = tokens[b, k]
        out.append(torch.stack(row))
    return torch.stack(out)


def naive_norm_pix_loss(pred, imgs, mask, p, norm_pix=True):
    target = naive_patchify(imgs.double(), p)
    pred = pred.double()
    B, L, n = pred.shape
    total, count = 0.0, 0.0
    for b in range(B):
        for l in range(L):
            if float(mask[b, l]) == 0.0:
                continue
            t = target[b, l]
            if norm_pix:
                mu = sum(t) / n
                var = sum((t - mu) ** 2) / (n - 1)  # unbiased, as the official code
                t = (t - mu) / torch.sqrt(var + 1e-6)
            total = total + float(mask[b, l]) * sum((pred[b, l] - t) ** 2) / n
            count += float(mask[b, l])
    return total / count


def naive_attention(q, k, v, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty(B, H, N, v.shape[-1], dtype=torch.float64)
    rows = []
    for b in range(B):
        for h in range(H):
            s = (q[b, h] @ k[b, h].T) * scale
            e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
            rows.append((e / e.sum(dim=-1, keepdim=True)) @ v[b, h])
    return torch.stack(rows).reshape(out.shape)


def _close(actual, expected, op, dtype, what):
    atol, rtol = _tol(op, dtype)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ patchify / unpatchify / gather
PATCH_CASES = [  # (B, C, H, W, p)
    (1, 3, 4, 4, 2),
    (3, 3, 9, 15, 3),   # non-square grid 3x5, odd patch
    (2, 1, 10, 5, 5),
    (2, 2, 7, 14, 7),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,p", PATCH_CASES)
def test_patchify_and_unpatchify(B, C, H, W, p, dtype):
    imgs = _randn(_gen("patchify", B, H, W), B, C, H, W, dtype=dtype)
    patches = reference.patchify(imgs, p)
    assert patches.dtype == dtype and patches.shape == (B, (H // p) * (W // p), p * p * C)
    torch.testing.assert_close(patches, naive_patchify(imgs, p), atol=0, rtol=0)  # pure data movement
    back = reference.unpatchify(patches, p, C, (H // p, W // p))
    torch.testing.assert_close(back, imgs, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,p", PATCH_CASES)
def test_patch_gather(B, C, H, W, p, dtype):
    g = _gen("gather", B, H, W)
    L = (H // p) * (W // p)
    K = max(1, L // 3)
    imgs = _randn(g, B, C, H, W, dtype=dtype).requires_grad_()
    ids_keep = _perms(g, B, L)[:, :K]
    out = reference.patch_gather(imgs, ids_keep, p)
    imgs64 = imgs.detach().double().requires_grad_()
    expected = naive_gather(imgs64, ids_keep, p)
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=0)
    up = _randn(g, *out.shape)
    (out.float() * up).sum().backward()
    (expected * up.double()).sum().backward()
    # d imgs: upstream values land on the kept pixels, zero elsewhere (one cast to dtype)
    _close(imgs.grad, imgs64.grad, "patch_gather", dtype, "grad imgs")


# ------------------------------------------------------------------ visible-only patch embedding
def naive_patch_embed_visible(imgs, ids_keep, weight, bias, pos_embed):
    """The conv at each kept patch, written as a sum over the patch's pixels, plus bias and position."""
    B, C, H, W = imgs.shape
    D, p = weight.shape[0], weight.shape[-1]
    w_cols = W // p
    rows = []
    for b in range(B):
        toks = []
        for idx in ids_keep[b].tolist():
            i, j = divmod(idx, w_cols)
            patch = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [C, p, p]
            tok = (weight * patch.unsqueeze(0)).sum(dim=(1, 2, 3))  # [D]
            if bias is not None:
                tok = tok + bias
            if pos_embed is not None:
                tok = tok + pos_embed[idx]
            toks.append(tok)
        rows.append(torch.stack(toks))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias,with_pos", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("B,C,H,W,p,D", [(1, 3, 4, 4, 2, 8), (3, 3, 9, 15, 3, 20), (2, 1, 10, 5, 5, 7)])
def test_patch_embed_visible(B, C, H, W, p, D, with_bias, with_pos, dtype):
    g = _gen("embed", B, H, W, with_bias, with_pos)
    L = (H // p) * (W // p)
    K = max(1, L // 2)
    imgs = _randn(g, B, C, H, W, dtype=dtype).requires_grad_()
    ids_keep = _perms(g, B, L)[:, :K]
    weight = (_randn(g, D, C, p, p) * 0.2).to(dtype).requires_grad_()
    bias = _randn(g, D, dtype=dtype).requires_grad_() if with_bias else None
    pos = _randn(g, L, D, dtype=dtype).requires_grad_() if with_pos else None
    leaves = [t for t in (imgs, weight, bias, pos) if t is not None]
    out = reference.patch_embed_visible(imgs, ids_keep, weight, bias, pos)
    assert out.shape == (B, K, D)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64)
    i64, w64 = next(it), next(it)
    b64 = next(it) if with_bias else None
    p64 = next(it) if with_pos else None
    expected = naive_patch_embed_visible(i64, ids_keep, w64, b64, p64)
    # a dot product of p*p*C terms rounded to the output dtype: scale the tolerance with its size
    atol, rtol = _tol("patch_embed_visible", dtype)
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(out.double(), expected, atol=atol * scale, rtol=rtol)
    up = _randn(g, *out.shape)
    (out.float() * up).sum().backward()
    (expected * up.double()).sum().backward()
    for name, a, e in zip(("imgs", "weight", "bias", "pos"), leaves, leaves64):
        gscale = max(1.0, float(e.grad.abs().max()))
        torch.testing.assert_close(a.grad.double(), e.grad, atol=atol * gscale, rtol=rtol,
                                   msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------------------------------ scatter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,K,D", [(1, 4, 1, 8), (3, 49, 12, 33), (2, 197, 49, 80), (2, 5, 5, 3)])
def test_patch_scatter(B, L, K, D, dtype):
    g = _gen("scatter", B, L, K, D)
    ids_shuffle = _perms(g, B, L)
    ids_keep, ids_restore = ids_shuffle[:, :K], torch.argsort(ids_shuffle, dim=1)
    tokens = _randn(g, B, K, D, dtype=dtype).requires_grad_()
    mask_token = _randn(g, D, dtype=dtype).requires_grad_()
    out = reference.patch_scatter(tokens, ids_restore, mask_token)
    t64 = tokens.detach().double().requires_grad_()
    m64 = mask_token.detach().double().requires_grad_()
    expected = naive_scatter(t64, ids_keep, L, m64)
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=0)
    up = _randn(g, B, L, D)
    (out.float() * up).sum().backward()
    (expected * up.double()).sum().backward()
    _close(tokens.grad, t64.grad, "patch_scatter", dtype, "grad tokens")
    # the mask token's gradient sums over all B*(L-K) hidden places: compare relative to its size
    # (with K == L no place is hidden and the oracle never touches the mask token: zero gradient)
    m64_grad = m64.grad if m64.grad is not None else torch.zeros_like(m64)
    atol, rtol = _tol("patch_scatter", dtype)
    torch.testing.assert_close(mask_token.grad.double(), m64_grad, rtol=rtol,
                               atol=atol * max(1.0, float(m64_grad.abs().max())))


@pytest.mark.parametrize("x_dtype,param_dtype", [(torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("B,L,K,D", [(1, 4, 1, 8), (3, 49, 12, 33), (2, 5, 5, 3)])
def test_decoder_unshuffle(B, L, K, D, x_dtype, param_dtype):
    """cls row, unshuffled tokens with mask tokens, + pos_embed, placed by hand; the output dtype is the
    promotion of the three inputs (fp32 for bf16 tokens beside fp32 parameters, as under AMP)."""
    g = _gen("unshuffle", B, L, K, D)
    ids_shuffle = _perms(g, B, L)
    ids_keep, ids_restore = ids_shuffle[:, :K], torch.argsort(ids_shuffle, dim=1)
    x = _randn(g, B, 1 + K, D, dtype=x_dtype).requires_grad_()
    mask_token = _randn(g, D, dtype=param_dtype).requires_grad_()
    pos = _randn(g, 1 + L, D, dtype=param_dtype).requires_grad_()
    out = reference.decoder_unshuffle(x, ids_restore, mask_token, pos)
    assert out.dtype == torch.promote_types(x_dtype, param_dtype)
    x64, m64, p64 = (t.detach().double().requires_grad_() for t in (x, mask_token, pos))
    body = naive_scatter(x64[:, 1:], ids_keep, L, m64)
    expected = torch.cat([x64[:, :1], body], dim=1) + p64
    torch.testing.assert_close(out.double(), expected, atol=0,
                               rtol=1e-2 if out.dtype == torch.bfloat16 else 1e-6)
    up = _randn(g, B, 1 + L, D)
    (out.float() * up).sum().backward()
    (expected * up.double()).sum().backward()
    atol, rtol = _tol("decoder_unshuffle", torch.bfloat16 if torch.bfloat16 in (x_dtype, param_dtype)
                      else x_dtype)
    for name, a, e in (("x", x, x64), ("mask_token", mask_token, m64), ("pos", pos, p64)):
        eg = e.grad if e.grad is not None else torch.zeros_like(e)
        torch.testing.assert_close(a.grad.double(), eg, rtol=rtol,
                                   atol=atol * max(1.0, float(eg.abs().max())),
                                   msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------------------------------ norm-pix loss
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("B,C,H,W,p", [(1, 3, 4, 4, 2), (3, 3, 9, 15, 3), (2, 1, 10, 5, 5)])
def test_norm_pix_loss(B, C, H, W, p, norm_pix, dtype):
    g = _gen("loss", B, H, W, norm_pix)
    L = (H // p) * (W // p)
    imgs = (_randn(g, B, C, H, W) * 2 + 0.5).to(dtype)
    pred = _randn(g, B, L, p * p * C, dtype=dtype).requires_grad_()
    mask = (torch.rand(B, L, generator=g) < 0.6).float()
    mask[:, 0] = 1.0  # at least one hidden patch per sample
    loss = reference.norm_pix_loss(pred, imgs, mask, p, norm_pix)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    p64 = pred.detach().double().requires_grad_()
    expected = naive_norm_pix_loss(p64, imgs, mask, p, norm_pix)
    # The reference computes in fp32 from the same (possibly bf16) values: fp32 tolerance either way.
    _close(loss, expected, "norm_pix_loss", torch.float32, "loss")
    loss.backward()
    expected.backward()
    _close(pred.grad, p64.grad, "norm_pix_loss", dtype, "grad pred")
    # visible patches get no gradient at all
    assert torch.all(pred.grad[mask == 0] == 0)


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,N,d", [(1, 1, 1, 8), (2, 3, 50, 16), (1, 2, 65, 80), (2, 1, 7, 59)])
def test_attention(B, H, N, d, dtype):
    g = _gen("attn", B, H, N, d)
    q, k, v = (_randn(g, B, H, N, d, dtype=dtype).requires_grad_() for _ in range(3))
    out = reference.attention(q, k, v)
    assert out.dtype == dtype and out.shape == (B, H, N, d)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = naive_attention(*leaves64)
    _close(out, expected, "attention", dtype, "out")
    up = _randn(g, B, H, N, d)
    (out.float() * up).sum().backward()
    (expected * up.double()).sum().backward()
    for name, a, e in zip("qkv", (q, k, v), leaves64):
        _close(a.grad, e.grad, "attention", dtype, f"grad {name}")


def test_attention_explicit_scale():
    g = _gen("attn-scale")
    q, k, v = (_randn(g, 2, 2, 9, 12) for _ in range(3))
    _close(reference.attention(q, k, v, scale=0.3), naive_attention(q, k, v, scale=0.3), "attention",
           torch.float32, "out")


# ------------------------------------------------------------------ gradcheck in fp64
def test_gradcheck_patch_gather():
    g = _gen("gc-gather")
    imgs = _randn(g, 2, 2, 6, 9, dtype=torch.float64).requires_grad_()
    ids_keep = _perms(g, 2, 6)[:, :4]
    assert torch.autograd.gradcheck(lambda x: reference.patch_gather(x, ids_keep, 3), (imgs,))


def test_gradcheck_patch_scatter():
    g = _gen("gc-scatter")
    ids_restore = torch.argsort(_perms(g, 2, 7), dim=1)
    tokens = _randn(g, 2, 3, 5, dtype=torch.float64).requires_grad_()
    mask_token = _randn(g, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, m: reference.patch_scatter(t, ids_restore, m),
                                    (tokens, mask_token))


def test_gradcheck_decoder_unshuffle():
    g = _gen("gc-unshuffle")
    ids_restore = torch.argsort(_perms(g, 2, 7), dim=1)
    x = _randn(g, 2, 4, 5, dtype=torch.float64).requires_grad_()
    mask_token = _randn(g, 5, dtype=torch.float64).requires_grad_()
    pos = _randn(g, 8, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, m, e: reference.decoder_unshuffle(a, ids_restore, m, e),
                                    (x, mask_token, pos))


def test_gradcheck_patch_embed_visible():
    g = _gen("gc-embed")
    imgs = _randn(g, 2, 2, 4, 6, dtype=torch.float64).requires_grad_()
    ids_keep = _perms(g, 2, 6)[:, :3]
    weight = _randn(g, 5, 2, 2, 2, dtype=torch.float64).requires_grad_()
    bias = _randn(g, 5, dtype=torch.float64).requires_grad_()
    pos = _randn(g, 6, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b, e: reference.patch_embed_visible(x, ids_keep, w, b, e),
                                    (imgs, weight, bias, pos))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_gradcheck_norm_pix_loss(norm_pix):
    g = _gen("gc-loss", norm_pix)
    imgs = _randn(g, 2, 2, 4, 6, dtype=torch.float64).requires_grad_()
    pred = _randn(g, 2, 6, 8, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: reference.norm_pix_loss(a, b, mask, 2, norm_pix),
                                    (pred, imgs))


def test_gradcheck_attention():
    g = _gen("gc-attn")
    q, k, v = (_randn(g, 1, 2, 5, 4, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(reference.attention, (q, k, v))


# ------------------------------------------------------------------ bad inputs to the public ops
def _imgs(*shape):
    return torch.randn(*shape)


BAD_GATHER = [
    (lambda: ops.patch_gather(_imgs(3, 8, 8), torch.zeros(1, 2, dtype=torch.long), 4), r"\[B, C, H, W\]"),
    (lambda: ops.patch_gather(_imgs(1, 3, 10, 8), torch.zeros(1, 2, dtype=torch.long), 4),
     r"10x8 is not divisible by patch size 4"),
    (lambda: ops.patch_gather(_imgs(2, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), 4),
     r"ids_keep must be \[B=2"),
    (lambda: ops.patch_gather(_imgs(1, 3, 8, 8), torch.zeros(1, 2), 4), r"ids_keep must be int64 or int32"),
    (lambda: ops.patch_gather(_imgs(1, 3, 8, 8), torch.zeros(1, 5, dtype=torch.long), 4), r"keeps 5 patches"),
    (lambda: ops.patch_gather(_imgs(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), 0),
     r"patch_size must be a positive int"),
]
BAD_SCATTER = [
    (lambda: ops.patch_scatter(torch.randn(4, 8), torch.zeros(1, 4, dtype=torch.long), torch.randn(8)),
     r"tokens must be \[B, K, D\]"),
    (lambda: ops.patch_scatter(torch.randn(1, 2, 8), torch.zeros(1, 4, dtype=torch.long), torch.randn(7)),
     r"mask_token must have D=8"),
    (lambda: ops.patch_scatter(torch.randn(1, 5, 8), torch.zeros(1, 4, dtype=torch.long), torch.randn(8)),
     r"L=4 places for K=5"),
    (lambda: ops.patch_scatter(torch.randn(2, 2, 8), torch.zeros(1, 4, dtype=torch.long), torch.randn(8)),
     r"ids_restore must be \[B=2"),
]
BAD_UNSHUFFLE = [
    (lambda: ops.decoder_unshuffle(torch.randn(1, 3, 8), torch.arange(4)[None], torch.randn(8),
                                   torch.randn(4, 8)),
     r"pos_embed must be \[1\+L, D\]"),
    (lambda: ops.decoder_unshuffle(torch.randn(1, 6, 8), torch.arange(4)[None], torch.randn(8),
                                   torch.randn(5, 8)),
     r"L=4 places for K=5"),
    (lambda: ops.decoder_unshuffle(torch.randn(2, 8), torch.arange(4)[None], torch.randn(8),
                                   torch.randn(5, 8)),
     r"x must be \[B, 1\+K, D\]"),
]
BAD_LOSS = [
    (lambda: ops.norm_pix_loss(torch.randn(1, 4, 48), _imgs(1, 3, 8, 8), torch.ones(1, 3), 4),
     r"mask must be \[B, L\]"),
    (lambda: ops.norm_pix_loss(torch.randn(1, 4, 47), _imgs(1, 3, 8, 8), torch.ones(1, 4), 4),
     r"pred must be \[B, L, p\*p\*C\]"),
    (lambda: ops.norm_pix_loss(torch.randn(1, 4, 48), _imgs(1, 3, 9, 8), torch.ones(1, 4), 4),
     r"9x8 is not divisible by patch size 4"),
]
BAD_EMBED = [
    (lambda: ops.patch_embed_visible(_imgs(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long),
                                     torch.randn(4, 3, 4)), r"conv weight \[D, C, p, p\]"),
    (lambda: ops.patch_embed_visible(_imgs(1, 3, 9, 8), torch.zeros(1, 2, dtype=torch.long),
                                     torch.randn(4, 3, 4, 4)), r"9x8 is not divisible by patch size 4"),
    (lambda: ops.patch_embed_visible(_imgs(1, 1, 8, 8), torch.zeros(1, 2, dtype=torch.long),
                                     torch.randn(4, 3, 4, 4)), r"1 channels, weight expects 3"),
    (lambda: ops.patch_embed_visible(_imgs(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long),
                                     torch.randn(4, 3, 4, 4), torch.randn(5)), r"bias must be \[D=4\]"),
    (lambda: ops.patch_embed_visible(_imgs(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long),
                                     torch.randn(4, 3, 4, 4), None, torch.randn(5, 4)),
     r"pos_embed must be \[L, D\]"),
]
BAD_ATTN = [
    (lambda: ops.attention(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)),
     r"\[B, heads, N, head_dim\]"),
    (lambda: ops.attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)),
     r"shape mismatch"),
    (lambda: ops.attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8).double(),
                           torch.randn(1, 2, 5, 8)), r"dtypes differ"),
]


@pytest.mark.parametrize("call,match", BAD_GATHER + BAD_SCATTER + BAD_UNSHUFFLE + BAD_LOSS + BAD_ATTN
                         + BAD_EMBED)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_backend_name_is_an_error():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        ops.patch_gather(_imgs(1, 3, 8, 8), torch.tensor([[0, 3]]), 4, backend="fastest")
