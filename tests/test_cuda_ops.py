"""CUDA backend (csrc/, built as fastmask._C) against the plain-PyTorch reference, forward and backward.

The kernel tests are marked `cuda` and skip, with the reason, where no GPU is visible or the
extension is not built (`FASTMASK_BUILD_CUDA=1 pip install -e . --no-build-isolation`; the CPU CI
only compiles and links it, see .ci/build_csrc.sh). Shapes cover both code paths of every kernel:
16-byte vectors (p = 16, D a multiple of 8) and the scalar fallback (p = 7 or 14, D = 3, inputs at
an odd storage offset), L not a multiple of any block, K = 1, B = 1, every patch kept. Tolerances come
from the backend record. The caching allocator's free blocks are NaN-filled before each call, so an
output element a kernel forgets to write shows up as a non-finite value.

The last test runs everywhere: without the extension or a GPU, the record says why and
`backend="cuda"` raises BackendUnavailable with that reason.
"""
import pytest
import torch

from fastmask import ops
from fastmask.ops import backends, reference
from fastmask.ops import cuda_backend as cb

REASON = cb._available()


def cuda_test(fn):
    """Marked `cuda`; skipped with the record's reason where the extension or the GPU is missing."""
    return pytest.mark.cuda(pytest.mark.skipif(REASON is not None, reason=f"cuda backend: {REASON}")(fn))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def dev():
    """The CUDA device, with the allocator's cached blocks poisoned (NaN) before the test's calls."""
    for n in (1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 22):
        torch.full((n,), float("nan"), device="cuda")  # freed at once; the block stays cached for reuse
    return torch.device("cuda")


def _tol(op, dtype, scale=1.0):
    atol, rtol = backends.backends_for(op)["cuda"].tolerances[dtype]
    return dict(atol=atol * max(scale, 1e-30), rtol=rtol)


def _gen(*key):
    return torch.Generator().manual_seed(abs(hash(key)) % (2 ** 31))


def _randn(g, *shape, device, dtype=torch.float32, offset=0):
    """Random normal values; offset > 0 puts them at that element offset of their storage (contiguous but
    not 16-byte aligned), which sends the kernels down their scalar path."""
    x = torch.randn(*shape, generator=g).to(dtype)
    if not offset:
        return x.to(device)
    out = torch.empty(x.numel() + offset, device=device, dtype=dtype)[offset:].view(shape)
    out.copy_(x)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def _masking(g, B, L, K, device):
    """(ids_keep [B, K], ids_restore [B, L], mask [B, L] 1 = hidden) as MAE's random_masking makes them."""
    ids_shuffle = torch.rand(B, L, generator=g).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(B, L)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :K].to(device), ids_restore.to(device), mask.to(device)


def _close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten, poisoned element?)"
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}")


# (B, C, H, W, p, K): L = 15 (odd), B = 1 with K = 1, p = 7 (scalar image runs), p = 16 (16-byte
# runs in every dtype, D = 768), p = 14 (ViT-H: 56-byte fp32 runs, scalar), every patch kept.
IMAGE_CASES = [(2, 3, 12, 20, 4, 5), (1, 3, 8, 8, 4, 1), (3, 2, 14, 14, 7, 1), (2, 3, 32, 48, 16, 5),
               (1, 3, 28, 42, 14, 2), (1, 3, 8, 12, 4, 6)]


@cuda_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", IMAGE_CASES)
@pytest.mark.parametrize("offset", [0, 1])
def test_patch_gather(dev, dtype, case, offset):
    B, C, H, W, p, K = case
    g = _gen("gather", case, dtype, offset)
    L = (H // p) * (W // p)
    ids_keep, _, _ = _masking(g, B, L, K, dev)
    imgs = _randn(g, B, C, H, W, device=dev, dtype=dtype, offset=offset).requires_grad_()
    ref_imgs = imgs.detach().float().requires_grad_()
    out = ops.patch_gather(imgs, ids_keep, p, backend="cuda")
    ref = reference.patch_gather(ref_imgs, ids_keep, p)
    assert out.shape == (B, K, p * p * C) and out.dtype == dtype
    _close(out, ref, _tol("patch_gather", dtype), "forward")
    gout = _randn(g, *out.shape, device=dev, dtype=dtype)
    out.backward(gout)
    ref.backward(gout.float())
    assert imgs.grad.dtype == dtype
    _close(imgs.grad, ref_imgs.grad, _tol("patch_gather", dtype), "imgs grad (zero where not kept)")


@cuda_test
def test_patch_gather_strided_and_int32(dev):
    """Channels-last images and int32 indices: made contiguous / int64 before the kernel, same result."""
    g = _gen("gather-strided")
    imgs = _randn(g, 2, 3, 32, 16, device=dev).to(memory_format=torch.channels_last)
    ids_keep, _, _ = _masking(g, 2, 2, 1, dev)
    out = ops.patch_gather(imgs, ids_keep.int(), 16, backend="cuda")
    expected = reference.patch_gather(imgs.contiguous(), ids_keep, 16)
    _close(out, expected, _tol("patch_gather", torch.float32), "fwd")


# (B, L, K, D): L odd, K = 1 with B = 1, D = 3 (scalar rows), D = 80 (fp32 vectors, scalar 16-bit),
# L = 197 over several 128-row chunks of the mask-token reduction, K = L (no hidden row).
SCATTER_CASES = [(2, 13, 5, 40), (1, 9, 1, 3), (3, 50, 12, 80), (2, 197, 49, 512), (2, 7, 7, 8)]


@cuda_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SCATTER_CASES)
@pytest.mark.parametrize("offset", [0, 1])
def test_patch_scatter(dev, dtype, case, offset):
    B, L, K, D = case
    g = _gen("scatter", case, dtype, offset)
    _, ids_restore, _ = _masking(g, B, L, K, dev)
    tokens = _randn(g, B, K, D, device=dev, dtype=dtype, offset=offset).requires_grad_()
    mask_token = _randn(g, 1, 1, D, device=dev).requires_grad_()  # fp32 parameter beside 16-bit tokens (AMP)
    ref_tokens = tokens.detach().float().requires_grad_()
    ref_mask = mask_token.detach().clone().requires_grad_()
    out = ops.patch_scatter(tokens, ids_restore, mask_token, backend="cuda")
    ref = reference.patch_scatter(ref_tokens, ids_restore, ref_mask.reshape(-1))
    assert out.shape == (B, L, D) and out.dtype == dtype
    _close(out, ref.to(dtype), _tol("patch_scatter", dtype), "forward")
    gout = _randn(g, *out.shape, device=dev, dtype=dtype)
    out.backward(gout)
    ref.backward(gout.float())
    _close(tokens.grad, ref_tokens.grad, _tol("patch_scatter", dtype), "tokens grad")
    assert mask_token.grad.shape == mask_token.shape and mask_token.grad.dtype == torch.float32
    # An fp32 sum of the 16-bit gradient rows in both: summation order is the only difference.
    _close(mask_token.grad, ref_mask.grad, _tol("norm_pix_loss", torch.float32, scale=1.0),
           "mask token grad (sum over hidden rows)")


# norm_pix_loss cases reuse the image cases that have a hidden patch, plus p = 32 (D = 3072).
LOSS_CASES = IMAGE_CASES[:5] + [(1, 3, 64, 96, 32, 2)]


@cuda_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("case", LOSS_CASES)
def test_norm_pix_loss(dev, dtype, norm_pix, case):
    B, C, H, W, p, K = case
    g = _gen("loss", case, dtype, norm_pix)
    L = (H // p) * (W // p)
    _, _, mask = _masking(g, B, L, K, dev)
    imgs = (_randn(g, B, C, H, W, device=dev) * 2 + 0.5).to(dtype)  # non-zero mean, non-unit variance
    pred = _randn(g, B, L, p * p * C, device=dev, dtype=dtype).requires_grad_()
    ref_pred = pred.detach().float().requires_grad_()
    loss = ops.norm_pix_loss(pred, imgs, mask, p, norm_pix, backend="cuda")
    ref = reference.norm_pix_loss(ref_pred, imgs.float(), mask, p, norm_pix)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # Same upcast inputs on both sides: the loss differs by fp32 summation order only.
    _close(loss, ref, _tol("norm_pix_loss", torch.float32), "loss")
    loss.backward()
    ref.backward()
    assert pred.grad.dtype == dtype
    _close(pred.grad, ref_pred.grad, _tol("norm_pix_loss", dtype, scale=ref_pred.grad.abs().max().item()),
           "pred grad (zero on visible patches)")


@cuda_test
@pytest.mark.parametrize("pred_dtype", [torch.bfloat16, torch.float16])
def test_norm_pix_loss_fp32_images_16bit_pred(dev, pred_dtype):
    """fp32 images beside a 16-bit decoder output (autocast): the target is read in fp32, not rounded."""
    g = _gen("loss-mixed", pred_dtype)
    B, C, H, W, p = 2, 3, 32, 48, 16
    L = (H // p) * (W // p)
    _, _, mask = _masking(g, B, L, 2, dev)
    imgs = _randn(g, B, C, H, W, device=dev) * 3 + 1
    pred = _randn(g, B, L, p * p * C, device=dev, dtype=pred_dtype).requires_grad_()
    ref_pred = pred.detach().float().requires_grad_()
    loss = ops.norm_pix_loss(pred, imgs, mask.bool(), p, backend="cuda")
    ref = reference.norm_pix_loss(ref_pred, imgs, mask, p)
    _close(loss, ref, _tol("norm_pix_loss", torch.float32), "loss")
    loss.backward()
    ref.backward()
    tol = _tol("norm_pix_loss", pred_dtype, scale=ref_pred.grad.abs().max().item())
    _close(pred.grad, ref_pred.grad, tol, "pred grad")


@cuda_test
def test_norm_pix_loss_strided_pred(dev):
    """A pred that is a slice of a wider decoder output (MAE drops the cls token)."""
    g = _gen("loss-strided")
    imgs = _randn(g, 2, 3, 8, 12, device=dev)
    full = _randn(g, 2, 7, 48, device=dev)
    _, _, mask = _masking(g, 2, 6, 2, dev)
    pred = full[:, 1:]
    expected = reference.norm_pix_loss(pred, imgs, mask, 4)
    loss = ops.norm_pix_loss(pred, imgs, mask, 4, backend="cuda")
    _close(loss, expected, _tol("norm_pix_loss", torch.float32), "loss")


@cuda_test
def test_reductions_are_deterministic(dev):
    """The mask-token gradient and the loss use fixed-order two-stage reductions: bitwise repeatable."""
    g = _gen("determinism")
    B, L, K, D = 4, 196, 49, 512
    _, ids_restore, mask = _masking(g, B, L, K, dev)
    grad = _randn(g, B, L, D, device=dev, dtype=torch.bfloat16)
    a = torch.ops.fastmask_cuda.patch_scatter_bwd(grad, ids_restore, K)[1]
    b = torch.ops.fastmask_cuda.patch_scatter_bwd(grad, ids_restore, K)[1]
    assert torch.equal(a, b)
    imgs = _randn(g, B, 3, 224, 224, device=dev)
    pred = _randn(g, B, L, 768, device=dev)
    l1 = ops.norm_pix_loss(pred, imgs, mask, 16, backend="cuda")
    l2 = ops.norm_pix_loss(pred, imgs, mask, 16, backend="cuda")
    assert torch.equal(l1, l2)


@cuda_test
def test_kernels_check_their_inputs(dev):
    """TORCH_CHECK in csrc/bindings.cpp: a wrong call to the raw op fails with a message, before any work."""
    imgs = torch.randn(1, 3, 8, 8, device=dev)
    op = torch.ops.fastmask_cuda
    with pytest.raises(RuntimeError, match="ids_keep must be int64"):
        op.patch_gather_fwd(imgs, torch.zeros(1, 2, dtype=torch.int32, device=dev), 4)
    with pytest.raises(RuntimeError, match="not divisible by patch size"):
        op.patch_gather_fwd(imgs, torch.zeros(1, 2, dtype=torch.long, device=dev), 3)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op.patch_gather_fwd(imgs.transpose(2, 3), torch.zeros(1, 2, dtype=torch.long, device=dev), 4)
    with pytest.raises(RuntimeError, match="mask_token must be"):
        op.patch_scatter_fwd(torch.randn(1, 2, 8, device=dev), torch.arange(4, device=dev)[None],
                             torch.randn(7, device=dev))
    with pytest.raises(RuntimeError, match="pred must be"):
        op.norm_pix_loss_fwd(torch.randn(1, 4, 47, device=dev), imgs, torch.ones(1, 4, device=dev), 4, True)
    with pytest.raises(RuntimeError, match="mask must be fp32"):
        op.norm_pix_loss_fwd(torch.randn(1, 4, 48, device=dev), imgs, torch.ones(1, 4, device=dev).bool(), 4,
                             True)


def _opcheck_cases(dev):
    g = _gen("opcheck")
    imgs = _randn(g, 2, 3, 8, 8, device=dev)
    ids_keep, ids_restore, mask = _masking(g, 2, 4, 2, dev)
    pred = _randn(g, 2, 4, 48, device=dev)
    op = torch.ops.fastmask_cuda
    return [
        (op.patch_gather_fwd.default, (imgs.clone().requires_grad_(), ids_keep, 4)),
        (op.patch_gather_bwd.default, (_randn(g, 2, 2, 48, device=dev), ids_keep, 4, 3, 8, 8)),
        (op.patch_scatter_fwd.default, (_randn(g, 2, 2, 16, device=dev).requires_grad_(), ids_restore,
                                        _randn(g, 16, device=dev).requires_grad_())),
        (op.patch_scatter_bwd.default, (_randn(g, 2, 4, 16, device=dev), ids_restore, 2)),
        (op.norm_pix_loss_fwd.default, (pred.clone().requires_grad_(), imgs, mask, 4, True)),
        (op.norm_pix_loss_bwd.default, (torch.tensor(1.5, device=dev), pred, imgs, mask, 4, False)),
    ]


@cuda_test
def test_opcheck(dev):
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of every registered op."""
    for op, args in _opcheck_cases(dev):
        torch.library.opcheck(op, args)


@cuda_test
def test_compile_fullgraph(dev):
    """torch.compile traces gather -> scatter -> loss through the fake impls without a graph break, and
    the compiled loss and gradients equal eager's."""
    torch._dynamo.reset()
    g = _gen("compile")
    B, C, H, W, p, K = 2, 3, 32, 32, 16, 2
    L, D = (H // p) * (W // p), p * p * C
    ids_keep, ids_restore, mask = _masking(g, B, L, K, dev)
    imgs = _randn(g, B, C, H, W, device=dev).requires_grad_()
    mask_token = _randn(g, 1, 1, D, device=dev).requires_grad_()

    def f(imgs, mask_token):
        x = ops.patch_gather(imgs, ids_keep, p, backend="cuda") * 2
        x = ops.patch_scatter(x, ids_restore, mask_token, backend="cuda")
        return ops.norm_pix_loss(x, imgs.detach(), mask, p, backend="cuda")

    eager = f(imgs, mask_token)
    eager_grads = torch.autograd.grad(eager, [imgs, mask_token])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(imgs, mask_token)
    grads = torch.autograd.grad(loss, [imgs, mask_token])
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


# ---- runs wherever fastmask._C imports, GPU or not (.ci/build_csrc.sh runs it against the fresh build)

@pytest.mark.skipif(cb._extension_reason() is not None, reason=str(cb._extension_reason()))
def test_fake_trace_forward_and_backward():
    """The fake impls and autograd registrations carry gather -> scatter -> loss and the whole backward
    through fake tensors: one graph of fastmask_cuda ops with the right shapes and dtypes, no kernel run."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    B, C, H, W, p, K = 2, 3, 32, 48, 16, 2
    L, D = (H // p) * (W // p), p * p * C

    def step(imgs, ids_keep, ids_restore, mask_token, mask):
        x = cb._patch_gather(imgs, ids_keep, p) * 2
        x = cb._patch_scatter(x, ids_restore, mask_token)
        loss = cb._norm_pix_loss(x, imgs.detach(), mask, p, True)
        return (loss, *torch.autograd.grad(loss, [imgs, mask_token]))

    def inputs():  # an fp64 mask token beside bf16 tokens: its gradient must come back fp64
        return (torch.empty(B, C, H, W, dtype=torch.bfloat16, requires_grad=True),
                torch.zeros(B, K, dtype=torch.long), torch.zeros(B, L, dtype=torch.int32),
                torch.empty(1, 1, D, dtype=torch.float64, requires_grad=True), torch.empty(B, L))

    with FakeTensorMode():
        loss, gimgs, gmask = step(*inputs())
    assert loss.shape == () and loss.dtype == torch.float32
    assert gimgs.shape == (B, C, H, W) and gimgs.dtype == torch.bfloat16
    assert gmask.shape == (1, 1, D) and gmask.dtype == torch.float64
    graph = make_fx(step, tracing_mode="fake")(*inputs())
    called = {n.target._opname for n in graph.graph.nodes if "fastmask_cuda" in str(n.target)}
    ops_ = ("patch_gather", "patch_scatter", "norm_pix_loss")
    assert called == {f"{op}_{d}" for op in ops_ for d in ("fwd", "bwd")}


# ---- runs everywhere

def test_record_says_why_when_unavailable():
    """Without the built extension or a GPU, each cuda record explains itself and a named call raises that."""
    imgs, ids = torch.randn(1, 3, 8, 8), torch.tensor([[1, 2]])
    calls = {
        "patch_gather": lambda: ops.patch_gather(imgs, ids, 4, backend="cuda"),
        "patch_scatter": lambda: ops.patch_scatter(torch.randn(1, 2, 8), torch.arange(4)[None],
                                                   torch.randn(8), backend="cuda"),
        "norm_pix_loss": lambda: ops.norm_pix_loss(torch.randn(1, 4, 48), imgs, torch.ones(1, 4), 4,
                                                   backend="cuda"),
    }
    for op, call in calls.items():
        rec = backends.backends_for(op)["cuda"]
        assert rec.devices == ("cuda",)
        assert set(rec.tolerances) == {torch.float32, torch.float16, torch.bfloat16}
        reason = rec.available()
        if reason is None:  # extension built and a GPU present: CPU tensors are declined by device
            expected = "device cpu"
        else:
            built = "fastmask._C" in reason and "FASTMASK_BUILD_CUDA=1" in reason
            assert built or "no CUDA device" in reason
            expected = reason.split(";")[0].split("(")[0].strip()
        with pytest.raises(ops.BackendUnavailable, match="backend 'cuda' cannot run") as e:
            call()
        assert expected in str(e.value)
        # auto passes over it on the CPU: the reference runs.
        assert ops.select(op, "auto", x=imgs).name == "torch"
    # The records decline oversize patches whatever the machine (the loss stages one patch per warp).
    big = torch.empty(1, 1, cb.MAX_PATCH_ELEMS + 3, device="meta")
    assert any("patch vector" in r for r in cb._loss_why_not(pred=big))
