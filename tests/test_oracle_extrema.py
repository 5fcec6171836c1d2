"""ExtreMA's loss, gradients and teacher update against an independent plain-PyTorch formulation.

The oracle below is written from shared/METHODS.md section 2 (and microsoft/ExtreMA's `vits.py` /
`lib/builder.py` layout: `base_encoder` with its projector as `head`, `momentum_encoder`,
`predictor`) with nothing from fastmask but the weights it loads: its own ViT blocks, CaiT class
attention, LayerNorm heads, disjoint masks from one noise draw, and the BYOL loss chunked per mask.
fastmask's ExtreMA gets the same weights (random, the teacher different from the student), the same
two colour views (x1 for the student, x2 for the teacher) and the same masks, and must give the
same loss, the same gradient on every trained parameter and the same EMA teacher after the step.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask.masking import Masks
from fastmask.methods import get_method
from fastmask.models import MODELS, VisionTransformer, register_model

B, IMG, P, RATIO, M = 3, 32, 8, 0.75, 3
L = (IMG // P) ** 2
N_KEEP = int(L * (1 - RATIO))  # 4 of 16 patches per mask; 3 disjoint masks use 12
D, HEADS, DEPTH = 64, 4, 2     # a micro ViT keeps the test at a second or two
PROJ_HIDDEN, PROJ, PRED_HIDDEN = 48, 16, 40
MODEL = "test_oracle_vit_micro"

if MODEL not in MODELS:
    @register_model(name=MODEL)
    def _micro(**kw):
        return VisionTransformer(**{"patch_size": P, "embed_dim": D, "depth": DEPTH, "num_heads": HEADS,
                                    **kw})


# ---------------------------------------------------------------------------------------------- oracle
def _ln(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """Pre-LN transformer block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = _ln(dim), _ln(dim)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = _Mlp(dim)

    def forward(self, x):
        Bn, N, C = x.shape
        h = self.norm1(x)
        q, k, v = self.attn.qkv(h).reshape(Bn, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(Bn, N, C))
        return x + self.mlp(self.norm2(x))


class _BlockCA(nn.Module):
    """Class attention: u = [cls, x]; cls += g1 * proj(softmax(q(LN1(u)_0) k(LN1(u))^T / sqrt(d)) v(LN1(u)));
    cls += g2 * mlp(LN2(cls)). The patch tokens x are not updated."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = _ln(dim), _ln(dim)
        self.attn = nn.Module()
        for name in ("q", "k", "v", "proj"):
            setattr(self.attn, name, nn.Linear(dim, dim))
        self.mlp = _Mlp(dim)
        self.gamma_1, self.gamma_2 = nn.Parameter(torch.empty(dim)), nn.Parameter(torch.empty(dim))

    def forward(self, x, cls):
        u = self.norm1(torch.cat([cls, x], 1))
        Bn, N, C = u.shape
        d = C // self.heads
        q = self.attn.q(u[:, :1]).reshape(Bn, 1, self.heads, d).transpose(1, 2)
        k = self.attn.k(u).reshape(Bn, N, self.heads, d).transpose(1, 2)
        v = self.attn.v(u).reshape(Bn, N, self.heads, d).transpose(1, 2)
        a = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(-1)
        cls = cls + self.gamma_1 * self.attn.proj((a @ v).transpose(1, 2).reshape(Bn, 1, C))
        return cls + self.gamma_2 * self.mlp(self.norm2(cls))


def _head(dims):
    """Linear -> LayerNorm -> GELU between every pair of dims, a bare Linear at the end."""
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers += [nn.LayerNorm(dims[i + 1]), nn.GELU()]
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    """CaiT-style ViT: patch tokens (+ fixed position embedding, no cls slot) through the blocks,
    cls pooled by 2 class-attention blocks, final LN on [cls, x], cls -> projector (`head`)."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, P, P)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        self.pos_embed = nn.Parameter(torch.empty(1, L, D), requires_grad=False)  # fixed sin-cos table
        self.blocks = nn.ModuleList([_Block(D, HEADS) for _ in range(DEPTH)])
        self.blocks_token = nn.ModuleList([_BlockCA(D, HEADS) for _ in range(2)])
        self.norm = _ln(D)
        self.head = _head([D, PROJ_HIDDEN, PROJ_HIDDEN, PROJ])

    def forward(self, imgs, keep=None):
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed
        if keep is not None:  # the student: the K masked copies stacked on the batch
            x = torch.cat([torch.gather(x, 1, ids[..., None].expand(-1, -1, D)) for ids in keep], 0)
        for blk in self.blocks:
            x = blk(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token:
            cls = blk(x, cls)
        return self.head(self.norm(torch.cat([cls, x], 1))[:, 0])


class _OracleExtreMA(nn.Module):
    def __init__(self):
        super().__init__()
        self.base_encoder, self.momentum_encoder = _Encoder(), _Encoder()
        self.predictor = _head([PROJ, PRED_HIDDEN, PROJ])

    def forward(self, x1, x2, keep):
        q = self.predictor(self.base_encoder(x1, keep))
        with torch.no_grad():
            k = self.momentum_encoder(x2)
        loss = 0.0
        for qi in q.chunk(len(keep)):
            loss = loss + ((F.normalize(qi, dim=1) - F.normalize(k, dim=1)) ** 2).sum(-1).mean()
        return loss / len(keep)


def _oracle_name(name: str) -> str:
    """fastmask's ExtreMA parameter name -> the oracle's (official) one."""
    for ours, theirs in (("student.encoder.vit.", "base_encoder."),
                         ("teacher.encoder.vit.", "momentum_encoder."),
                         ("student.encoder.ca_blocks.", "base_encoder.blocks_token."),
                         ("teacher.encoder.ca_blocks.", "momentum_encoder.blocks_token."),
                         ("student.projector.mlp.", "base_encoder.head."),
                         ("teacher.projector.mlp.", "momentum_encoder.head."),
                         ("predictor.mlp.", "predictor.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(name)


def _oracle_state(method) -> dict[str, torch.Tensor]:
    state = {}
    for name, t in method.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        if name.endswith("pos_embed"):
            t = t[:, 1:]  # fastmask keeps a (unused) cls slot in the ViT's table; ExtreMA has none
        state[_oracle_name(name)] = t
    return state


# ---------------------------------------------------------------------------------------------- helpers
def _disjoint_keep(noise: torch.Tensor) -> list[torch.Tensor]:
    """noise [B, L] -> M index lists [B, n]: chunk k of argsort(noise) (ExtreMA's disjoint sampling)."""
    order = torch.argsort(noise, dim=1)
    return [order[:, k * N_KEEP:(k + 1) * N_KEEP] for k in range(M)]


def _as_masks(keep: list[torch.Tensor]) -> Masks:
    """The oracle's index lists in fastmask's Masks layout: row k*B + b is mask k of image b."""
    ids_keep = torch.cat(keep, 0)
    mask = torch.ones(ids_keep.shape[0], L).scatter_(1, ids_keep, 0.0)
    hidden = torch.argsort(mask, dim=1, stable=True)[:, N_KEEP:]
    ids_restore = torch.argsort(torch.cat([ids_keep, hidden], 1), dim=1)
    return Masks(ids_keep, ids_restore, mask)


class _FixedViews:
    """Stands in for the colour augmentation: the student gets x1, the teacher x2."""

    def __init__(self, x1, x2):
        self.x1, self.x2 = x1, x2

    def two_views(self, imgs, generator=None, draws=None):
        return self.x1, self.x2


def _method(seed: int):
    torch.manual_seed(seed)
    m = get_method("extrema")(model=MODEL, img_size=IMG, mask_ratio=RATIO, masking="multi",
                              num_masks=M, proj_hidden_dim=PROJ_HIDDEN, proj_dim=PROJ,
                              pred_hidden_dim=PRED_HIDDEN, momentum=0.99, drop_path_rate=0.0, color_aug=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight random and away from its init; the teacher differs from the student
        for _, t in m.named_parameters():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return m.train()


# ---------------------------------------------------------------------------------------------- tests
def test_multi_masking_is_the_disjoint_split_of_one_noise_draw():
    from fastmask.draws import Draws
    from fastmask.masking import build_masker

    keys = torch.tensor([3, 1_000_003, 77])
    masks = build_masker("multi", mask_ratio=RATIO, num_masks=M)(B, (IMG // P, IMG // P),
                                                                 draws=Draws(keys, seed=5))
    keep = _disjoint_keep(Draws(keys, seed=5).uniform(L))  # the same per-image noise, one row per image
    assert torch.equal(masks.ids_keep, torch.cat(keep, 0))
    torch.testing.assert_close(masks.mask, _as_masks(keep).mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_extrema_step_matches_oracle(seed):
    """Loss, gradients of every trained parameter, and the EMA teacher after on_step_end."""
    m = _method(seed)
    oracle = _OracleExtreMA()
    oracle.load_state_dict(_oracle_state(m), strict=True)
    g = torch.Generator().manual_seed(100 + seed)
    x1, x2 = torch.randn(B, 3, IMG, IMG, generator=g), torch.randn(B, 3, IMG, IMG, generator=g)
    keep = _disjoint_keep(torch.rand(B, L, generator=g))
    m.augment = _FixedViews(x1, x2)

    # the images only reach the views
    out = m(torch.randn(B, 3, IMG, IMG, generator=g), masks=_as_masks(keep))
    out["loss"].backward()
    ref = oracle(x1, x2, keep)
    ref.backward()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    assert ref.item() > 0.1  # a real loss, not two collapsed or identical branches

    theirs = dict(oracle.named_parameters())
    trained = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert len(trained) == sum(1 for n, p in theirs.items()
                               if p.requires_grad and not n.startswith("momentum_"))
    for name, p in trained:
        ref_grad = theirs[_oracle_name(name)].grad
        if name.endswith("cls_token") or "blocks" in name or "patch_embed" in name:
            assert ref_grad is not None and ref_grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-6, msg=lambda s: f"{name}: {s}")
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith("teacher."))

    # The teacher's EMA after the step: theta_t <- m theta_t + (1 - m) theta_s, m(t) cosine from 0.99 to 1.
    step, total = 3, 10
    mom = 1 - (1 - 0.99) * (math.cos(math.pi * step / total) + 1) / 2
    student = {n: p.detach().clone() for n, p in oracle.base_encoder.named_parameters()}
    expected = {n: mom * p.detach() + (1 - mom) * student[n]
                for n, p in oracle.momentum_encoder.named_parameters()}
    m.on_step_end(step, total)
    for name, p in m.named_parameters():
        if name.startswith("teacher."):
            p = p[:, 1:] if name.endswith("pos_embed") else p
            torch.testing.assert_close(p, expected[_oracle_name(name)[len("momentum_encoder."):]], rtol=1e-6,
                                       atol=1e-7, msg=lambda s: f"{name}: {s}")
