"""Each objective alone: against a straightforward formulation on random inputs, gradients, known values."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmask.methods.momentum import cosine_momentum, ema_update_, make_teacher
from fastmask.objectives.byol import byol_loss, simsiam_loss
from fastmask.objectives.dino import DINOLoss
from fastmask.objectives.infonce import info_nce, nt_xent


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------- BYOL / SimSiam
@pytest.mark.parametrize("B,d", [(1, 3), (7, 33), (16, 256)])
def test_byol_matches_normalized_mse(B, d):
    p, z = _rand(B, d, seed=1), _rand(B, d, seed=2)
    ref = ((F.normalize(p, dim=-1) - F.normalize(z, dim=-1)) ** 2).sum(-1).mean()
    torch.testing.assert_close(byol_loss(p, z), ref, rtol=1e-5, atol=1e-6)


def test_byol_known_values_and_stop_gradient():
    p = _rand(5, 9, seed=3).requires_grad_()
    z = (p.detach() * 3.0).requires_grad_()          # same direction, other norm
    assert byol_loss(p, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -z).item() == pytest.approx(4.0, abs=1e-6)
    loss = byol_loss(p, _rand(5, 9, seed=4).requires_grad_())
    loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    z2 = _rand(5, 9, seed=5).requires_grad_()
    byol_loss(p, z2).backward()
    assert z2.grad is None                            # target is stop-gradient


def test_byol_gradcheck():
    z = _rand(4, 6, seed=6)
    torch.autograd.gradcheck(lambda p: byol_loss(p, z).double(), (_rand(4, 6, seed=7).requires_grad_(),))


def test_simsiam_matches_cosine():
    p, z = _rand(6, 11, seed=8), _rand(6, 11, seed=9)
    ref = -(F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(simsiam_loss(p, z), ref)
    assert simsiam_loss(p, 2 * p).item() == pytest.approx(-1.0, abs=1e-6)


def test_pair_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        byol_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        simsiam_loss(torch.randn(3), torch.randn(3))


# ---------------------------------------------------------------- InfoNCE
def _info_nce_loop(q, k, t, pos):
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    total = 0.0
    for i in range(q.shape[0]):
        s = torch.stack([torch.dot(q[i], k[j]) / t for j in range(k.shape[0])])
        total = total - (s[pos[i]] - torch.logsumexp(s, 0))
    return total / q.shape[0]


@pytest.mark.parametrize("N,M,d", [(1, 1, 4), (5, 5, 17), (6, 13, 8)])
def test_info_nce_matches_loop(N, M, d):
    q, k = _rand(N, d, seed=10), _rand(M, d, seed=11)
    pos = torch.randint(0, M, (N,), generator=torch.Generator().manual_seed(0)) if N != M else None
    ref = _info_nce_loop(q, k, 0.2, pos if pos is not None else torch.arange(N))
    torch.testing.assert_close(info_nce(q, k, 0.2, positives=pos), ref, rtol=1e-5, atol=1e-5)


def test_info_nce_tiny_temperature_finite_and_grads():
    q = _rand(8, 16, seed=12, dtype=torch.float32).requires_grad_()
    k = _rand(8, 16, seed=13, dtype=torch.float32).requires_grad_()
    loss = info_nce(q.bfloat16(), k.bfloat16(), temperature=1e-3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.5).double(),
                             (_rand(4, 5, seed=14).requires_grad_(), _rand(4, 5, seed=15).requires_grad_()))


def test_info_nce_perfect_match_is_low():
    k = _rand(32, 64, seed=16)
    assert info_nce(k, k, 0.05).item() < 1e-3
    assert info_nce(k, k.roll(1, 0), 0.05).item() > 5.0


def test_info_nce_errors():
    with pytest.raises(ValueError, match="positives=None"):
        info_nce(torch.randn(3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)


# ---------------------------------------------------------------- NT-Xent
def _nt_xent_loop(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n, B = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + B) % n
        num = torch.exp(z[i] @ z[pos] / t)
        den = sum(torch.exp(z[i] @ z[j] / t) for j in range(n) if j != i)
        total = total - torch.log(num / den)
    return total / n


@pytest.mark.parametrize("B,d", [(1, 5), (3, 7), (9, 32)])
def test_nt_xent_matches_loop(B, d):
    z1, z2 = _rand(B, d, seed=17), _rand(B, d, seed=18)
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), _nt_xent_loop(z1, z2, 0.5), rtol=1e-5, atol=1e-5)


def test_nt_xent_symmetric_and_grads():
    z1 = _rand(6, 10, seed=19).requires_grad_()
    z2 = _rand(6, 10, seed=20).requires_grad_()
    torch.testing.assert_close(nt_xent(z1, z2, 0.2), nt_xent(z2, z1, 0.2))
    nt_xent(z1, z2, 0.2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3).double(),
                             (_rand(3, 4, seed=21).requires_grad_(), _rand(3, 4, seed=22).requires_grad_()))


# ---------------------------------------------------------------- DINO
def _dino_ref(students, teachers, center, ts, tt):
    total, n = 0.0, 0
    for ti, t in enumerate(teachers):
        q = F.softmax((t - center) / tt, dim=-1)
        for si, s in enumerate(students):
            if si == ti:
                continue
            total = total + (-(q * F.log_softmax(s / ts, dim=-1)).sum(-1)).mean()
            n += 1
    return total / n


def test_dino_matches_reference_and_updates_center():
    K, B = 37, 5
    students = [_rand(B, K, seed=30 + i, dtype=torch.float32) for i in range(4)]
    teachers = [_rand(B, K, seed=40 + i, dtype=torch.float32) for i in range(2)]
    loss_fn = DINOLoss(K, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_epochs=11)
    loss_fn.center.copy_(_rand(1, K, seed=50, dtype=torch.float32))
    c0 = loss_fn.center.clone()
    got = loss_fn(students, teachers, epoch=5)
    torch.testing.assert_close(got, _dino_ref(students, teachers, c0, 0.1, 0.055), rtol=1e-5, atol=1e-5)
    expected_center = 0.9 * c0 + 0.1 * torch.cat(teachers).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)


@pytest.mark.parametrize("warmup", [0, 1, 2, 30])
def test_dino_teacher_temperature_follows_dinos_per_epoch_schedule(warmup):
    # DINO's teacher_temp_schedule: concat(linspace(warmup_temp, temp, W), temp for the other epochs)
    epochs = 40
    schedule = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(epochs - warmup) * 0.07))
    loss_fn = DINOLoss(8, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_epochs=warmup)
    got = [loss_fn.teacher_temp_at(e) for e in range(epochs)]
    np.testing.assert_allclose(got, schedule, rtol=1e-12)
    assert loss_fn.teacher_temp_at(None) == 0.07


def test_dino_gradients_only_to_student_and_eval_keeps_center():
    K = 16
    s = [_rand(3, K, seed=60 + i, dtype=torch.float32).requires_grad_() for i in range(3)]
    t = [_rand(3, K, seed=70 + i, dtype=torch.float32).requires_grad_() for i in range(2)]
    loss_fn = DINOLoss(K).eval()
    loss_fn(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    assert loss_fn.center.abs().sum() == 0  # eval mode: no centre update


def test_dino_identical_views_minimum_is_entropy():
    # Student equal to the (sharpened) teacher target at the same temperature: CE = entropy of target.
    K = 8
    t = _rand(4, K, seed=80, dtype=torch.float32)
    loss_fn = DINOLoss(K, student_temp=0.1, teacher_temp=0.1).eval()
    got = loss_fn([t, t], [t, t])
    q = F.softmax(t / 0.1, dim=-1)
    torch.testing.assert_close(got, (-(q * q.log()).sum(-1)).mean())


def test_dino_errors():
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        DINOLoss(8)([torch.randn(2, 8), torch.randn(2, 7)], [torch.randn(2, 8)])
    with pytest.raises(ValueError, match="no pair"):
        DINOLoss(8)([torch.randn(2, 8)], [torch.randn(2, 8)])


# ---------------------------------------------------------------- momentum teacher
def test_teacher_copy_frozen_and_ema():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(pt, ps) and pt.data_ptr() != ps.data_ptr()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.9)
    for b, pt, ps in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(pt, 0.9 * b + 0.1 * ps)
    snap = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(snap, teacher.parameters()))
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_ema_rejects_mismatch():
    with pytest.raises(ValueError, match="differ"):
        ema_update_(torch.nn.Linear(3, 4), torch.nn.Linear(3, 5), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(torch.nn.Linear(3, 4), torch.nn.Linear(3, 4), 1.5)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    vals = [cosine_momentum(t, 40, 0.99) for t in range(41)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_ema_bf16_teacher_keeps_moving_through_fp32_shadow():
    torch.manual_seed(1)
    student = torch.nn.Linear(16, 16)
    teacher = make_teacher(student).bfloat16()
    target = torch.randn(16, 16) * 0.01 + student.weight.detach()  # small difference: bf16-invisible per step
    with torch.no_grad():
        student.weight.copy_(target)
    w0 = teacher.weight.float().clone()
    for _ in range(200):
        ema_update_(teacher, student, 0.996)
    # fp32 EMA after 200 steps moves 1 - 0.996^200 = 55% of the way
    expected = w0 + (1 - 0.996 ** 200) * (target - w0)
    torch.testing.assert_close(teacher.weight.float(), expected, rtol=0, atol=2e-2)
    assert (teacher.weight.float() - w0).abs().mean() > 0.5 * (target - w0).abs().mean()


def test_info_nce_batched_groups_match_per_group_loop():
    G, N, M, d = 3, 4, 6, 5
    q, k = _rand(G, N, d, seed=90), _rand(G, M, d, seed=91)
    pos = torch.randint(0, M, (G, N), generator=torch.Generator().manual_seed(1))
    ref = torch.stack([_info_nce_loop(q[g], k[g], 0.3, pos[g]) for g in range(G)]).mean()
    torch.testing.assert_close(info_nce(q, k, 0.3, positives=pos), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="positives must be"):
        info_nce(q, k, 0.3, positives=pos[0])
