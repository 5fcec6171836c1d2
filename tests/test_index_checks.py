"""The index contract (ids_keep rows distinct, ids_restore rows permutations of 0..L-1) and FASTMASK_CHECK.

The fused backwards write each gradient row once, without atomics, trusting the contract; the first
test shows what a broken index does to them (rows of the gradient never written). FASTMASK_CHECK=1
(tests/conftest.py turns it on for the whole suite) makes every op that takes indices validate them and
raise one clear error; without it the ops read no index value on the host (tests/test_no_host_sync.py
proves the training step sync-free with it off).
"""
import pytest
import torch

from fastmask import ops
from fastmask.ops import triton_backend as tb

IMGS = torch.randn(2, 3, 8, 8)  # L = 4 patches of 4 x 4
W = torch.randn(6, 3, 4, 4)


@pytest.fixture
def checks_on(monkeypatch):
    monkeypatch.setenv("FASTMASK_CHECK", "1")


@pytest.fixture
def checks_off(monkeypatch):
    monkeypatch.setenv("FASTMASK_CHECK", "0")


@pytest.mark.skipif("cpu" not in tb._DEVICES, reason="triton on CPU needs TRITON_INTERPRET=1")
def test_broken_permutation_leaves_gradient_rows_unwritten(checks_off, monkeypatch):
    """Why the contract matters: token 1 is never named, so its gradient row is never written
    (NaN-poisoned)."""
    monkeypatch.setenv("FASTMASK_POISON_OUTPUTS", "1")
    tokens = torch.randn(1, 2, 8, requires_grad=True)
    out = ops.patch_scatter(tokens, torch.tensor([[0, 0, 2, 3]]), torch.randn(8), backend="triton")
    out.backward(torch.randn_like(out))
    assert torch.isnan(tokens.grad[0, 1]).all() and torch.isfinite(tokens.grad[0, 0]).all()


CALLS = {
    "patch_gather": lambda ids_keep, ids_restore: ops.patch_gather(IMGS, ids_keep, 4),
    "patch_embed_visible": lambda ids_keep, ids_restore: ops.patch_embed_visible(IMGS, ids_keep, W),
    "patch_scatter": lambda ids_keep, ids_restore: ops.patch_scatter(torch.randn(2, 2, 8), ids_restore,
                                                                     torch.randn(8)),
    "decoder_unshuffle": lambda ids_keep, ids_restore: ops.decoder_unshuffle(
        torch.randn(2, 3, 8), ids_restore, torch.randn(8), torch.randn(5, 8)),
}
GOOD = (torch.tensor([[3, 0], [1, 2]]), torch.tensor([[1, 3, 0, 2], [2, 0, 3, 1]]))
BAD = [  # (ids_keep, ids_restore, message for ids_keep ops, message for ids_restore ops)
    (torch.tensor([[3, 0], [1, 1]]), torch.tensor([[1, 3, 0, 2], [2, 0, 2, 1]]),
     r"ids_keep row 1 holds patch 1 more than once", r"ids_restore row 1 holds patch 2 more than once"),
    (torch.tensor([[3, 4], [1, 2]]), torch.tensor([[1, 3, 0, -1], [2, 0, 3, 1]]),
     r"ids_keep\[0, 1\] = 4 is outside \[0, L=4\)", r"ids_restore\[0, 3\] = -1 is outside \[0, L=4\)"),
]


@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("bad", BAD, ids=["repeat", "range"])
def test_check_rejects_broken_indices_before_any_work(op, bad, checks_on):
    ids_keep, ids_restore, msg_keep, msg_restore = bad
    CALLS[op](*GOOD)  # a valid call passes the check
    msg = msg_keep if op in ("patch_gather", "patch_embed_visible") else msg_restore
    with pytest.raises(ValueError, match=f"fastmask.ops.{op}: {msg}"):
        CALLS[op](ids_keep, ids_restore)


@pytest.mark.parametrize("op", ["patch_gather", "patch_scatter"])
def test_without_the_check_the_reference_runs_on_broken_indices(op, checks_off):
    ids_keep, ids_restore, _, _ = BAD[0]
    assert torch.isfinite(CALLS[op](ids_keep, ids_restore)).all()
