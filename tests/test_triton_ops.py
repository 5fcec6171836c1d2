"""Triton backend of the fastmask ops against the plain-PyTorch reference, forward and backward.

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set here at import
time, before anything imports `fastmask.kernels` (triton.jit reads it when a kernel is decorated;
fastmask.ops imports the kernels lazily, on first call). With a GPU the same tests run compiled on
CUDA tensors (marked `cuda`) and the CPU variants are skipped. Every output buffer the launchers
allocate is NaN-poisoned (FASTMASK_POISON_OUTPUTS=1), so an element a kernel forgets to write fails the
comparison. Tolerances come from the backend records, not from this file.
"""
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastmask import ops  # noqa: E402
from fastmask.ops import backends, reference  # noqa: E402
from fastmask.ops.nn import Attention  # noqa: E402
from fastmask.ops import triton_backend as tb  # noqa: E402

pytestmark = pytest.mark.skipif(tb._available() is not None, reason=str(tb._available()))


def _devices():
    devs = []
    if "cpu" in tb._DEVICES:
        devs.append("cpu")
    if torch.cuda.is_available():
        devs.append(pytest.param("cuda", marks=pytest.mark.cuda))
    no_run = pytest.mark.skip(reason="no GPU and TRITON_INTERPRET is not 1")
    return devs or [pytest.param("cpu", marks=no_run)]


DEVICES = _devices()
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FASTMASK_POISON_OUTPUTS", "1")


def _tol(op, dtype):
    atol, rtol = backends.backends_for(op)["triton"].tolerances[dtype]
    return dict(atol=atol, rtol=rtol)


def _gen(*key):
    return torch.Generator().manual_seed(abs(hash(key)) % (2 ** 31))


def _randn(g, *shape, device, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _masking(g, B, L, K, device):
    """(ids_keep [B, K], ids_restore [B, L], mask [B, L] 1 = hidden) as MAE's random_masking makes them."""
    ids_shuffle = torch.rand(B, L, generator=g).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(B, L)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :K].to(device), ids_restore.to(device), mask.to(device)


def _scaled(tol, ref):
    """Gradients: absolute tolerance relative to the gradient's largest magnitude (sums grow with size)."""
    return {"atol": tol["atol"] * max(1.0, ref.abs().max().item()), "rtol": tol["rtol"]}


def _close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten, poisoned element?)"
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}")


# (B, C, H, W, p, K): L not a multiple of the row block, K = 1, B = 1, a patch vector (7*7*2 = 98)
# spanning several element blocks, every patch kept (last case; the loss needs a hidden patch).
IMAGE_CASES = [(2, 3, 12, 20, 4, 5), (1, 3, 8, 8, 4, 1), (3, 2, 14, 14, 7, 1), (1, 3, 8, 12, 4, 6)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", IMAGE_CASES)
def test_patch_gather(device, dtype, case):
    B, C, H, W, p, K = case
    g = _gen("gather", case, dtype)
    L = (H // p) * (W // p)
    ids_keep, _, _ = _masking(g, B, L, K, device)
    imgs = _randn(g, B, C, H, W, device=device, dtype=dtype).requires_grad_()
    ref_imgs = imgs.detach().float().requires_grad_()
    out = ops.patch_gather(imgs, ids_keep, p, backend="triton")
    ref = reference.patch_gather(ref_imgs, ids_keep, p)
    assert out.shape == (B, K, p * p * C) and out.dtype == dtype
    _close(out, ref, _tol("patch_gather", dtype), "forward")
    gout = _randn(g, *out.shape, device=device, dtype=dtype)
    out.backward(gout)
    ref.backward(gout.float())
    _close(imgs.grad, ref_imgs.grad, _tol("patch_gather", dtype), "imgs grad (zero where not kept)")


@pytest.mark.parametrize("device", DEVICES)
def test_patch_gather_strided_inputs(device):
    """Channels-last images and int32 indices are read in place (no copy, same result)."""
    g = _gen("gather-strided")
    imgs = _randn(g, 2, 3, 12, 16, device=device).to(memory_format=torch.channels_last)
    ids_keep, _, _ = _masking(g, 2, 12, 4, device)
    out = ops.patch_gather(imgs, ids_keep.int(), 4, backend="triton")
    expected = reference.patch_gather(imgs.contiguous(), ids_keep, 4)
    _close(out, expected, _tol("patch_gather", torch.float32), "fwd")


# (B, L, K, D): L not a multiple of the row block, K = 1, B = 1, D spanning several blocks, K = L.
SCATTER_CASES = [(2, 13, 5, 40), (1, 9, 1, 16), (3, 50, 12, 24), (2, 7, 7, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SCATTER_CASES)
def test_patch_scatter(device, dtype, case):
    B, L, K, D = case
    g = _gen("scatter", case, dtype)
    _, ids_restore, _ = _masking(g, B, L, K, device)
    tokens = _randn(g, B, K, D, device=device, dtype=dtype).requires_grad_()
    mask_token = _randn(g, 1, 1, D, device=device).requires_grad_()  # fp32 parameter, as under AMP
    ref_tokens = tokens.detach().float().requires_grad_()
    ref_mask = mask_token.detach().clone().requires_grad_()
    out = ops.patch_scatter(tokens, ids_restore, mask_token, backend="triton")
    ref = reference.patch_scatter(ref_tokens, ids_restore, ref_mask.reshape(-1))
    assert out.shape == (B, L, D) and out.dtype == dtype
    _close(out, ref, _tol("patch_scatter", dtype), "forward")
    gout = _randn(g, *out.shape, device=device, dtype=dtype)
    out.backward(gout)
    ref.backward(gout.float())
    _close(tokens.grad, ref_tokens.grad, _tol("patch_scatter", dtype), "tokens grad")
    assert mask_token.grad.shape == mask_token.shape and mask_token.grad.dtype == torch.float32
    _close(mask_token.grad, ref_mask.grad, _tol("norm_pix_loss", dtype), "mask token grad (hidden-row sum)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in SCATTER_CASES if c[1] < 50])
def test_decoder_unshuffle(device, dtype, case):
    """MAE's decoder input in one pass: tokens in dtype, fp32 mask token and position embedding (as under
    AMP), output in the promoted dtype; gradients of x (in dtype), the mask token and a trainable pos."""
    B, L, K, D = case
    g = _gen("unshuffle", case, dtype)
    _, ids_restore, _ = _masking(g, B, L, K, device)
    x = _randn(g, B, 1 + K, D, device=device, dtype=dtype).requires_grad_()
    mask_token = _randn(g, D, device=device).requires_grad_()
    pos = _randn(g, 1, 1 + L, D, device=device)[0].requires_grad_()  # a view, as decoder_pos_embed[0]
    leaves = [x, mask_token, pos]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    out = ops.decoder_unshuffle(x, ids_restore, mask_token, pos, backend="triton")
    ref = reference.decoder_unshuffle(refs[0], ids_restore, refs[1], refs[2])
    assert out.shape == (B, 1 + L, D) and out.dtype == torch.float32 == ref.dtype
    _close(out, ref, {"atol": 0, "rtol": 0}, "forward (same fp32 additions as the reference)")
    gout = _randn(g, *out.shape, device=device)
    out.backward(gout)
    ref.backward(gout)
    assert x.grad.dtype == dtype
    for name, t, r in zip(("x", "mask_token", "pos"), leaves, refs):
        _close(t.grad, r.grad, _scaled(_tol("decoder_unshuffle", dtype), r.grad), f"{name} grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("case", IMAGE_CASES[:3])
def test_norm_pix_loss(device, dtype, norm_pix, case):
    B, C, H, W, p, K = case
    g = _gen("loss", case, dtype, norm_pix)
    L = (H // p) * (W // p)
    _, _, mask = _masking(g, B, L, K, device)
    imgs = (_randn(g, B, C, H, W, device=device) * 2 + 0.5).to(dtype)  # non-zero mean and non-unit var
    pred = _randn(g, B, L, p * p * C, device=device, dtype=dtype).requires_grad_()
    ref_pred = pred.detach().float().requires_grad_()
    mask_in = mask.bool() if dtype == torch.bfloat16 else mask  # bool masks are read in place too
    loss = ops.norm_pix_loss(pred, imgs, mask_in, p, norm_pix, backend="triton")
    ref = reference.norm_pix_loss(ref_pred, imgs.float(), mask, p, norm_pix)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    tol = _tol("norm_pix_loss", dtype)
    _close(loss, ref, tol, "loss")
    loss.backward()
    ref.backward()
    assert pred.grad.dtype == dtype
    _close(pred.grad, ref_pred.grad, _scaled(tol, ref_pred.grad), "pred grad (zero on visible patches)")


@pytest.mark.parametrize("device", DEVICES)
def test_norm_pix_loss_strided_pred(device):
    """A pred that is a slice of a wider decoder output (MAE drops the cls token) is read in place."""
    g = _gen("loss-strided")
    imgs = _randn(g, 2, 3, 8, 12, device=device)
    full = _randn(g, 2, 7, 48, device=device)
    _, _, mask = _masking(g, 2, 6, 2, device)
    pred = full[:, 1:]
    expected = reference.norm_pix_loss(pred, imgs, mask, 4)
    loss = ops.norm_pix_loss(pred, imgs, mask, 4, backend="triton")
    _close(loss, expected, _tol("norm_pix_loss", torch.float32), "loss")


# (B, H, Nq, Nk, Dh): N in {1, 49, 50, 65}, Nq != Nk (class attention with one query), head dims 32-128.
ATTN_CASES = [(1, 2, 49, 49, 80), (2, 1, 1, 65, 32), (1, 1, 50, 50, 48), (1, 1, 65, 17, 64),
              (1, 1, 20, 33, 96), (1, 1, 17, 17, 128)]


def _attention_case(device, dtype, case, scale):
    B, H, NQ, NK, DH = case
    g = _gen("attn", case, dtype, scale)
    q = _randn(g, B, H, NQ, DH, device=device, dtype=dtype).requires_grad_()
    k = _randn(g, B, H, NK, DH, device=device, dtype=dtype).requires_grad_()
    v = _randn(g, B, H, NK, DH, device=device, dtype=dtype).requires_grad_()
    refs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = ops.attention(q, k, v, scale=scale, backend="triton")
    ref = reference.attention(*refs, scale=scale)
    tol = _tol("attention", dtype)
    assert out.shape == (B, H, NQ, DH) and out.dtype == dtype
    _close(out, ref, tol, "out")
    gout = _randn(g, *out.shape, device=device, dtype=dtype)
    out.backward(gout)
    ref.backward(gout.float())
    for name, t, r in zip("qkv", (q, k, v), refs):
        _close(t.grad, r.grad, _scaled(tol, r.grad), f"d{name}")
    if dtype != torch.float32:
        # flash-attention's criterion: error against fp32 at most 2x the error of plain PyTorch attention
        # run eagerly in the same dtype (its tests' attention_ref(upcast=False)), plus a hair for ties.
        lows = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        low = _attention_low_precision(*lows, scale)
        low.backward(gout)
        mine_all = (out, q.grad, k.grad, v.grad)
        low_all = (low, *(t.grad for t in lows))
        ref_all = (ref, *(t.grad for t in refs))
        for name, mine, lp, r in zip(("out", "dq", "dk", "dv"), mine_all, low_all, ref_all):
            err = (mine.float() - r.detach()).abs().max().item()
            base = (lp.float() - r.detach()).abs().max().item()
            assert err <= 2 * base + 1e-5, \
                f"{name}: error {err:.3g} > 2 x eager torch's {dtype} error {base:.3g}"


def _attention_low_precision(q, k, v, scale):
    """softmax(q k^T * scale) v with every tensor in q's dtype, as an eager bf16/fp16 model computes it."""
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.matmul(torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention(device, dtype, case):
    _attention_case(device, dtype, case, None)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_fp16_and_custom_scale(device):
    _attention_case(device, torch.float16, (2, 2, 49, 49, 64), 0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_on_qkv_views(device):
    """q, k, v as the strided views a fused qkv projection yields: read in place, no copies."""
    g = _gen("attn-views")
    B, N, H, DH = 2, 50, 2, 32
    qkv = _randn(g, B, N, 3, H, DH, device=device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = ops.attention(q, k, v, backend="triton")
    _close(out, reference.attention(q, k, v), _tol("attention", torch.float32), "out")
    out.transpose(1, 2).reshape(B, N, H * DH)  # the output projection's view works without a copy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos,with_bias", [(True, True), (False, True), (False, False)])
def test_patch_embed_visible(device, dtype, with_pos, with_bias):
    """Against MAE's own order of work: conv patch embedding of all patches, + pos_embed, keep ids_keep."""
    g = _gen("embed", dtype, with_pos, with_bias)
    B, C, H, W, p, K, D = 2, 3, 12, 16, 4, 5, 24
    L = (H // p) * (W // p)
    ids_keep, _, _ = _masking(g, B, L, K, device)
    params = [_randn(g, D, C, p, p, device=device) * 0.2, _randn(g, D, device=device) if with_bias else None,
              _randn(g, L, D, device=device) if with_pos else None, _randn(g, B, C, H, W, device=device)]
    mine = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in params]
    ref = [t.detach().clone().requires_grad_() if t is not None else None for t in params]
    weight, bias, pos, imgs = mine
    out = ops.patch_embed_visible(imgs, ids_keep, weight, bias, pos, backend="triton")
    rw, rb, rpos, rimgs = ref
    full = F.conv2d(rimgs, rw, rb, stride=p).flatten(2).transpose(1, 2)
    full = full + rpos if rpos is not None else full
    expected = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    tol = _tol("patch_embed_visible", dtype)
    _close(out, expected, {"atol": tol["atol"] * 4, "rtol": tol["rtol"]}, "forward")
    gout = _randn(g, *out.shape, device=device, dtype=dtype)
    out.backward(gout)
    expected.backward(gout.float())
    for name, t, r in zip(("weight", "bias", "pos_embed", "imgs"), mine, ref):
        if t is not None:
            _close(t.grad, r.grad, _scaled(tol, r.grad), f"{name} grad")


def test_torch_patch_embed_matches_conv():
    """The torch record (the CPU path) equals the conv formulation too, in fp32."""
    g = _gen("embed-torch")
    imgs, w, b, pos = torch.randn(2, 3, 8, 12, generator=g), torch.randn(6, 3, 4, 4, generator=g), \
        torch.randn(6, generator=g), torch.randn(6, 6, generator=g)
    ids_keep, _, _ = _masking(g, 2, 6, 3, "cpu")
    full = F.conv2d(imgs, w, b, stride=4).flatten(2).transpose(1, 2) + pos
    expected = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 6))
    torch.testing.assert_close(ops.patch_embed_visible(imgs, ids_keep, w, b, pos, backend="torch"), expected,
                               atol=1e-5, rtol=1e-5)


def test_patch_embed_visible_rejects_bad_inputs():
    imgs, w = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4)
    with pytest.raises(ValueError, match="pos_embed must be"):
        ops.patch_embed_visible(imgs, torch.zeros(2, 2, dtype=torch.long), w, None, torch.randn(5, 6))
    with pytest.raises(ValueError, match="channels"):
        ops.patch_embed_visible(torch.randn(2, 1, 8, 8), torch.zeros(2, 2, dtype=torch.long), w)


# ---- records, custom ops, torch.compile

def test_records_declare_and_decline():
    for op in ("patch_gather", "patch_scatter", "decoder_unshuffle", "norm_pix_loss", "attention",
               "patch_embed_visible"):
        rec = backends.backends_for(op)["triton"]
        assert set(rec.tolerances) == {torch.float32, torch.float16, torch.bfloat16}
    q = torch.randn(1, 1, 4, 512)
    reasons = dict(ops.explain("attention", q=q, k=q, v=q))["triton"]
    assert any("head dim 512" in r for r in reasons)
    with pytest.raises(ops.BackendUnavailable, match="float64"):
        ops.patch_gather(torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.tensor([[2, 0]]), 4,
                         backend="triton")


def _opcheck_cases(device):
    g = _gen("opcheck")
    imgs = _randn(g, 2, 3, 8, 8, device=device)
    ids_keep, ids_restore, mask = _masking(g, 2, 4, 2, device)
    tokens, mtok = _randn(g, 2, 2, 16, device=device), _randn(g, 16, device=device)
    pred = _randn(g, 2, 4, 48, device=device)
    q, k = _randn(g, 1, 2, 5, 16, device=device), _randn(g, 1, 2, 3, 16, device=device)
    out, lse = tb.attention_fwd_triton(q, k, k, None)
    return [
        (tb.patch_gather_fwd_triton, (imgs.requires_grad_(), ids_keep, 4)),
        (tb.patch_gather_bwd_triton, (_randn(g, 2, 2, 48, device=device), ids_keep, 3, 8, 8, 4)),
        (tb.patch_scatter_fwd_triton, (tokens.requires_grad_(), ids_restore, mtok.requires_grad_())),
        (tb.patch_scatter_bwd_triton, (_randn(g, 2, 4, 16, device=device), ids_restore, 2)),
        (tb.decoder_unshuffle_fwd_triton, (_randn(g, 2, 3, 16, device=device,
                                                  dtype=torch.bfloat16).requires_grad_(),
                                           ids_restore, mtok, _randn(g, 5, 16, device=device))),
        (tb.decoder_unshuffle_bwd_triton, (_randn(g, 2, 5, 16, device=device), ids_restore, 2,
                                           torch.bfloat16)),
        (tb.norm_pix_loss_fwd_triton, (pred.requires_grad_(), imgs.detach(), mask, 4, True)),
        (tb.norm_pix_loss_bwd_triton, (torch.tensor(1.5, device=device), pred.detach(), imgs.detach(), mask,
                                       4, False)),
        (tb.attention_fwd_triton, (q.requires_grad_(), k.requires_grad_(),
                                   k.detach().clone().requires_grad_(), 0.5)),
        (tb.attention_bwd_triton, (torch.randn_like(out), q.detach(), k.detach(), k.detach(), out, lse,
                                   None)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


class TinyMAE(torch.nn.Module):
    """Visible-only patch embedding, one attention layer, unshuffle with mask tokens, norm-pix loss."""

    def __init__(self, backend, dim=32, heads=2, patch=4, chans=3, grid=6):
        super().__init__()
        L = grid
        self.backend, self.patch = backend, patch
        self.proj_weight = torch.nn.Parameter(torch.randn(dim, chans, patch, patch) * 0.1)
        self.proj_bias = torch.nn.Parameter(torch.randn(dim) * 0.1)
        self.pos = torch.nn.Parameter(torch.randn(L, dim) * 0.1)
        self.attn = Attention(dim, heads, backend=backend)
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.head = torch.nn.Linear(dim, patch * patch * chans)

    def forward(self, imgs, ids_keep, ids_restore, mask):
        x = ops.patch_embed_visible(imgs, ids_keep, self.proj_weight, self.proj_bias, self.pos,
                                    backend=self.backend)
        x = x + self.attn(x)
        x = ops.patch_scatter(x, ids_restore, self.mask_token, backend=self.backend)
        return ops.norm_pix_loss(self.head(x), imgs, mask, self.patch, backend=self.backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    "cpu" not in tb._DEVICES, reason="triton on CPU needs TRITON_INTERPRET=1"))])
def test_compile_tiny_mae_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the whole model with the ops (fake impls for triton), and the
    compiled loss and gradients equal eager's. aot_eager: traces dynamo + AOT autograd, no C++ build."""
    torch._dynamo.reset()
    g = _gen("compile", backend)
    torch.manual_seed(0)
    model = TinyMAE(backend)
    imgs = torch.randn(2, 3, 8, 12, generator=g)
    ids_keep, ids_restore, mask = _masking(g, 2, 6, 2, "cpu")
    eager = model(imgs, ids_keep, ids_restore, mask)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(imgs, ids_keep, ids_restore, mask)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter never runs Triton's GPU code generator: lower kernels to sm_90 cubins as their
    launchers launch them (ptxas ships with triton, no GPU needed), so a GPU-only compile error fails
    here, not on the GPU, and the register counts the issue asked for hold (bias_gelu under 100)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "fastmask.kernels._compile_check", "--arch", "90", "--json", str(out),
           "--kernels", "bias_gelu", "patch_gather_fwd", "attention_bwd_dq", "patch_scatter_fwd"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    missing = "No such file" in res.stderr or "not found" in res.stderr
    if res.returncode and "ptxas" in res.stderr and missing:
        pytest.skip("triton's ptxas is not available here")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    names = {r["kernel"] for r in rows}
    assert names == {"_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_patch_gather_fwd_kernel",
                     "_attention_bwd_dq_kernel", "_patch_scatter_fwd_kernel"}
    assert "CLS=1 HAS_POS=True" in " ".join(r["case"] for r in rows)  # decoder_unshuffle's variant
    gelu = [r for r in rows if "bias_gelu" in r["kernel"]]
    assert len(gelu) == 8  # every autotune config of both kernels
    assert all(0 < r["regs"] < 100 and r["spill_stores"] == 0 for r in gelu), gelu
    assert "_bias_gelu_bwd_kernel" in res.stdout and "spill st/ld" in res.stdout


@pytest.mark.slow
@pytest.mark.skipif("cpu" not in tb._DEVICES, reason="triton on CPU needs TRITON_INTERPRET=1")
def test_compile_mae_model_with_triton_ops():
    """The project's own MAE (encoder on visible patches, decoder, loss) with backend="triton" compiles with
    fullgraph=True and matches the same weights run eagerly with backend="torch"."""
    from fastmask.models.mae import MaskedAutoencoderViT

    torch._dynamo.reset()
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
              decoder_depth=1, decoder_num_heads=2)
    torch.manual_seed(0)
    ref_model = MaskedAutoencoderViT(backend="torch", **kw)
    model = MaskedAutoencoderViT(backend="triton", **kw)
    model.load_state_dict(ref_model.state_dict())
    g = _gen("mae-compile")
    imgs = torch.randn(2, 3, 16, 16, generator=g)
    ids_keep, ids_restore, mask = _masking(g, 2, 16, 4, "cpu")

    def step(m, backend):
        return ops.norm_pix_loss(m(imgs, ids_keep, ids_restore), imgs, mask, 4, backend=backend)

    expected = step(ref_model, "torch")
    expected_grads = torch.autograd.grad(expected, [p for p in ref_model.parameters() if p.requires_grad])
    loss = torch.compile(lambda: step(model, "triton"), fullgraph=True, backend="aot_eager")()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
