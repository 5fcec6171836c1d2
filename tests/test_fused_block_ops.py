"""Fused block ops (residual-add + LayerNorm, bias + GELU): Triton vs reference.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
import os

import pytest
import torch

from fastmask.ops import backends
from fastmask.ops.bias_gelu import bias_gelu, bias_gelu_reference
from fastmask.ops.layer_norm import add_layer_norm, add_layer_norm_reference

DTYPES = [torch.float32, torch.bfloat16]


def _devices():
    devs = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        devs.append("cpu")
    if torch.cuda.is_available():
        devs.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devs


def _tol(op, dtype):
    return backends.backends_for(op)["triton"].tolerances[dtype]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FASTMASK_POISON_OUTPUTS", "1")


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,with_residual", [((7, 48), True), ((1, 80), False), ((2, 5, 33), True),
                                                 ((3, 1, 192), False)])
def test_add_layer_norm_matches_reference(device, dtype, shape, with_residual):
    g = torch.Generator().manual_seed(hash((shape, with_residual)) % 1000)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()
    x, r = mk(*shape), (mk(*shape) if with_residual else None)
    N = shape[-1]
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(device).requires_grad_()
    b = (0.1 * torch.randn(N, generator=g)).to(device).requires_grad_()
    y, h = add_layer_norm(x, r, w, b, backend="triton")
    y_ref, h_ref = add_layer_norm_reference(x, r, w, b)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    inputs = [x] + ([r] if r is not None else []) + [w, b]
    grads = torch.autograd.grad((y * dy).float().sum() + (h * dh).float().sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * dy).float().sum() + (h_ref * dh).float().sum(), inputs)
    atol, rtol = _tol("add_layer_norm", dtype)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h, h_ref, atol=atol, rtol=rtol)
    for a, e in zip(grads, grads_ref):
        # dweight/dbias sum over rows: allow the tolerance to grow with the number of rows summed.
        scale = 1 if a.dim() == len(shape) else max(1, x.numel() // N) ** 0.5
        torch.testing.assert_close(a.float(), e.float(), atol=atol * scale * 4, rtol=rtol * 4)


@pytest.mark.parametrize("device", _devices())
def test_add_layer_norm_fp32_residual_stream_from_bf16(device):
    x = torch.randn(6, 40, device=device, dtype=torch.bfloat16)
    r = torch.randn(6, 40, device=device, dtype=torch.float32)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    y, h = add_layer_norm(x, r, w, b, residual_dtype=torch.float32, backend="triton")
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(h, x.float() + r)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("shape", [(7, 48), (2, 5, 33)])
def test_add_layer_norm_bf16_branch_into_fp32_stream(device, shape):
    """The autocast layout of a block: bf16 branch output x, fp32 residual stream. h is fp32 and the
    gradients come back in each input's own dtype, equal to the reference's."""
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_()
    r = torch.randn(*shape, generator=g).to(device).requires_grad_()
    N = shape[-1]
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(device).requires_grad_()
    b = (0.1 * torch.randn(N, generator=g)).to(device).requires_grad_()
    y, h = add_layer_norm(x, r, w, b, backend="triton")
    y_ref, h_ref = add_layer_norm_reference(x, r, w, b)
    assert (y.dtype, h.dtype) == (torch.bfloat16, torch.float32) == (y_ref.dtype, h_ref.dtype)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y * dy).float().sum() + (h * dh).sum(), [x, r, w, b])
    grads_ref = torch.autograd.grad((y_ref * dy).float().sum() + (h_ref * dh).sum(), [x, r, w, b])
    assert [t.dtype for t in grads] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    atol, rtol = _tol("add_layer_norm", torch.bfloat16)
    torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)
    for a, e in zip(grads, grads_ref):
        scale = 1 if a.dim() == len(shape) else max(1, x.numel() // N) ** 0.5
        torch.testing.assert_close(a.float(), e.float(), atol=atol * scale * 4, rtol=rtol * 4)
    # dresidual is the fp32 gradient itself (not a bf16-rounded copy): equal to the reference's tightly
    torch.testing.assert_close(grads[1], grads_ref[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", _devices())
def test_add_layer_norm_backward_writes_one_gradient_when_dtypes_agree(device):
    """dx and dresidual share one tensor written once in the input dtype; a second tensor is written only
    for an fp32 residual beside a 16-bit x. Checked on the backward op itself (and opcheck'd)."""
    import importlib

    ln = importlib.import_module("fastmask.ops.layer_norm")
    M, N = 5, 24
    dy, h = torch.randn(M, N, device=device, dtype=torch.bfloat16), torch.randn(M, N, device=device)
    w = torch.randn(N, device=device)
    _, _, mean, rstd = ln._fwd_triton(h.bfloat16(), None, w, w, 1e-6, torch.float32)
    same = ln._bwd_triton(dy, h, w, mean, rstd, dy, torch.bfloat16, torch.bfloat16)
    mixed = ln._bwd_triton(dy, h, w, mean, rstd, h, torch.bfloat16, torch.float32)
    assert [t.dtype for t in same] == [torch.float32, torch.float32, torch.bfloat16]
    assert [t.dtype for t in mixed] == [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    torch.testing.assert_close(mixed[2].float(), mixed[3], atol=1e-2, rtol=1e-2)  # the same dh, two roundings
    for args in ((dy, h, w, mean, rstd, dy, torch.bfloat16, torch.bfloat16),
                 (dy, h, w, mean, rstd, None, torch.bfloat16, torch.float32)):
        torch.library.opcheck(ln._bwd_triton, args)


def test_residual_dtype_defaults_to_the_stream_dtype():
    """Eager `x + residual` promotion outside autocast; fp32 under autocast (the official AMP stream)."""
    from fastmask.ops.layer_norm import stream_dtype

    bf, f32 = torch.empty(2, 4, dtype=torch.bfloat16), torch.empty(2, 4)
    assert stream_dtype(bf, None) == torch.bfloat16 and stream_dtype(bf, bf) == torch.bfloat16
    assert stream_dtype(bf, f32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stream_dtype(bf, None) == torch.float32 and stream_dtype(bf, bf) == torch.float32
        _, h = add_layer_norm(bf, bf, torch.ones(4), torch.zeros(4))
    assert h.dtype == torch.float32


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 37), (1, 16), (2, 3, 80), (11, 70)])
def test_bias_gelu_matches_reference(device, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(shape[-1], generator=g).to(device=device, dtype=dtype).requires_grad_()
    y, y_ref = bias_gelu(x, b, backend="triton"), bias_gelu_reference(x, b)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).float().sum(), [x, b])
    grads_ref = torch.autograd.grad((y_ref * dy).float().sum(), [x, b])
    atol, rtol = _tol("bias_gelu", dtype)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(grads[0], grads_ref[0], atol=atol, rtol=rtol)
    rows = x.numel() // shape[-1]
    torch.testing.assert_close(grads[1].float(), grads_ref[1].float(), atol=atol * rows, rtol=rtol * 4)


@pytest.mark.parametrize("device", _devices())
def test_fused_block_ops_pass_opcheck(device):
    import importlib

    # the package exports functions of the same names, so fetch the modules themselves
    bg, ln = (importlib.import_module(f"fastmask.ops.{m}") for m in ("bias_gelu", "layer_norm"))

    x = torch.randn(3, 24, device=device, requires_grad=True)
    r = torch.randn(3, 24, device=device, requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True)
    b = torch.randn(24, device=device, requires_grad=True)
    torch.library.opcheck(ln._fwd_triton, (x, r, w, b, 1e-6, torch.float32))
    torch.library.opcheck(ln._fwd_triton, (x, None, w, b, 1e-6, torch.float32))
    torch.library.opcheck(bg._fwd_triton, (x, b))


def test_named_backend_that_cannot_run_says_why():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(backends.BackendUnavailable, match="bias_gelu: backend 'triton'.*dtype torch.float64"):
        bias_gelu(x, torch.zeros(8, dtype=torch.float64), backend="triton")
    # auto never fails: it falls back to the reference
    torch.testing.assert_close(bias_gelu(x, torch.zeros(8, dtype=torch.float64)),
                               bias_gelu_reference(x, torch.zeros(8, dtype=torch.float64)))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="bias must be"):
        bias_gelu(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError, match="residual shape"):
        add_layer_norm(torch.randn(2, 8), torch.randn(2, 9), torch.ones(8), torch.zeros(8))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_vit_fused_block_chain_matches_eager_blocks(checkpoint):
    """The ViT's blocks run as one fused chain (add+LN, bias+GELU) when a fused backend is named, and
    give the eager model's features and gradients."""
    from fastmask.models import create_model
    from fastmask.models.blocks import fused_chain_backend

    torch.manual_seed(0)
    fused = create_model("vit_tiny_patch16", img_size=32, depth=2, backend="triton")
    eager = create_model("vit_tiny_patch16", img_size=32, depth=2, backend="torch")
    eager.load_state_dict(fused.state_dict())
    fused.set_grad_checkpointing(checkpoint)
    imgs = torch.randn(2, 3, 32, 32)
    x = torch.randn(2, 5, 192)
    assert fused_chain_backend(fused.blocks, x, fused.norm, "triton") == "triton"
    assert fused_chain_backend(eager.blocks, x, eager.norm, "torch") is None
    out_f, out_e = fused.forward_features(imgs), eager.forward_features(imgs)
    torch.testing.assert_close(out_f, out_e, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out_f)
    (out_f * g).sum().backward()
    (out_e * g).sum().backward()
    for (name, pf), pe in zip(fused.named_parameters(), eager.parameters()):
        if pf.grad is not None or pe.grad is not None:
            torch.testing.assert_close(pf.grad, pe.grad, atol=1e-4, rtol=1e-4, msg=name)
