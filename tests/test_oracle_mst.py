"""MST's loss against an independent plain-PyTorch formulation written from the method description
(shared/METHODS.md section 5) and DINO's main_dino.py (issue 15, item 4).

The oracle shares no code with fastmask.models / objectives / methods: the ViT runs on timm's own
`Block`s, the patch embedding, the DINO head, the image decoder and the DINO cross-entropy are
written out with torch.nn.functional on the weights MST holds. One step on a fixed tiny batch:
2 global 32 px views + 2 local 16 px views (ViT patch 8, 2 blocks), the teacher perturbed away from
the student, a non-zero centre, the teacher temperature mid warm-up, masks chosen by the oracle
from its own teacher attention and handed to MST (`masks=`). Loss, its parts, the centre update
and the student's gradients must agree.
"""
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmask.masking import Masks
from fastmask.methods import get_method
from fastmask.models import MODELS, VisionTransformer, register_model

timm = pytest.importorskip("timm")

IMG, LOCAL, P, D, DEPTH, HEADS = 32, 16, 8, 64, 2, 4
B, N_LOCAL, K = 3, 2, 48
MODEL = "test_vit_oracle_mst_patch8"  # not the RelaxMIM oracle's name: that one is 48 wide
RHO, PROB = 0.5, 0.5

if MODEL not in MODELS:
    @register_model(name=MODEL)
    def _oracle_vit(**kw):
        return VisionTransformer(**{"patch_size": P, "embed_dim": D, "depth": DEPTH, "num_heads": HEADS,
                                    **kw})


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mst(**kw):
    torch.manual_seed(0)
    args = dict(out_dim=K, head_hidden_dim=40, bottleneck_dim=16, decoder_width=16, drop_path_rate=0.0,
                local_crops_number=N_LOCAL, local_crop_size=LOCAL, norm_last_layer=False, color_aug=False,
                teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=5,
                freeze_last_layer=1, mask_rho=RHO, mask_prob=PROB)
    m = get_method("mst")(model=MODEL, img_size=IMG, masking="attention", **{**args, **kw})
    with torch.no_grad():  # a teacher that is not the student, a centre that is not zero
        for i, p in enumerate(m.teacher.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(100 + i)))
        m.dino_loss.center.copy_(torch.randn(1, K, generator=_gen(7)))
    m.set_epoch_length(3)
    m.step = 7  # epoch 2 of the 5-epoch temperature warm-up; past the 1 frozen epoch
    return m


def _part(sd: dict, prefix: str) -> dict:
    """The entries of `sd` under `prefix`, with the prefix cut off."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _views():
    sizes = [IMG, IMG] + [LOCAL] * N_LOCAL
    return [torch.randn(B, 3, s, s, generator=_gen(20 + i)) for i, s in enumerate(sizes)]


class OracleViT(torch.nn.Module):
    """timm Blocks + a hand-written patch embedding, loaded from a fastmask ViT's state dict."""

    def __init__(self, sd: dict):
        super().__init__()
        from timm.models.vision_transformer import Block

        norm = partial(torch.nn.LayerNorm, eps=1e-6)
        self.blocks = torch.nn.ModuleList([Block(D, HEADS, 4.0, qkv_bias=True, norm_layer=norm)
                                           for _ in range(DEPTH)])
        self.norm = norm(D)
        self.patch_w = torch.nn.Parameter(sd["patch_embed.proj.weight"].clone())
        self.patch_b = torch.nn.Parameter(sd["patch_embed.proj.bias"].clone())
        self.cls_token = torch.nn.Parameter(sd["cls_token"].clone())
        self.register_buffer("pos_embed", sd["pos_embed"].clone())
        rest = {k: v for k, v in sd.items() if k.startswith(("blocks.", "norm."))}
        missing, unexpected = self.load_state_dict(rest, strict=False)
        assert not unexpected and set(missing) <= {"patch_w", "patch_b", "cls_token", "pos_embed"}, missing

    def pos(self, grid: int) -> torch.Tensor:
        """[1, grid*grid, D]: the patch rows, interpolated bicubically to the grid (DINO's
        interpolate_pos_encoding, by output size)."""
        g0 = IMG // P
        patches = self.pos_embed[:, 1:].reshape(1, g0, g0, D).permute(0, 3, 1, 2)
        if grid != g0:
            patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        return patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D)

    def forward(self, x, mask=None, mask_token=None, cls_attention=False):
        """x [b, 3, S, S] -> tokens [b, 1+L, D] (after the final norm); mask [b, L] bool: those patches'
        embeddings replaced by mask_token before the position embedding. cls_attention: also the last
        block's cls-query attention over the patches, mean over heads, [b, L]."""
        tok = F.conv2d(x, self.patch_w, self.patch_b, stride=P).flatten(2).transpose(1, 2)
        if mask is not None:
            tok = torch.where(mask[..., None], mask_token.reshape(1, 1, D).expand_as(tok), tok)
        tok = tok + self.pos(x.shape[-1] // P)
        h = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), tok], dim=1)
        for blk in self.blocks[:-1]:
            h = blk(h)
        last = self.blocks[-1]
        qkv = last.attn.qkv(last.norm1(h)).reshape(h.shape[0], h.shape[1], 3, HEADS, D // HEADS)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)   # [b, heads, n, d]
        attn = torch.softmax(q @ k.transpose(-1, -2) * (D // HEADS) ** -0.5, dim=-1)[:, :, 0, 1:].mean(1)
        out = self.norm(last(h))
        return (out, attn) if cls_attention else out


def _head(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """DINO's head: 3 Linears with GELU, l2-normalize, weight-normed last layer (g * v / ||v||)."""
    for i in (0, 2):
        x = F.gelu(F.linear(x, sd[f"{prefix}mlp.{i}.weight"], sd[f"{prefix}mlp.{i}.bias"]))
    x = F.normalize(F.linear(x, sd[f"{prefix}mlp.4.weight"], sd[f"{prefix}mlp.4.bias"]), dim=-1)
    v, g = sd[f"{prefix}last_layer.weight_v"], sd[f"{prefix}last_layer.weight_g"]
    return x @ (g * v / v.norm(dim=1, keepdim=True)).t()


def _decoder(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b, L, D] -> image [b, 3, IMG, IMG]: 1x1 conv, per factor 2 of the patch a stride-2
    transposed conv + GroupNorm(1) + GELU, then a 3x3 conv (fastmask's [unverified] decoder layout)."""
    g = IMG // P
    x = tokens.transpose(1, 2).reshape(tokens.shape[0], D, g, g)
    x = F.conv2d(x, sd["decoder.net.0.weight"], sd["decoder.net.0.bias"])
    i = 1
    for _ in range(int(np.log2(P))):
        x = F.conv_transpose2d(x, sd[f"decoder.net.{i}.weight"], sd[f"decoder.net.{i}.bias"], stride=2)
        x = F.gelu(F.group_norm(x, 1, sd[f"decoder.net.{i + 1}.weight"], sd[f"decoder.net.{i + 1}.bias"]))
        i += 3
    return F.conv2d(x, sd[f"decoder.net.{i}.weight"], sd[f"decoder.net.{i}.bias"], padding=1)


def _dino_ce(student: list, teacher: list, center, t_temp, s_temp=0.1):
    """DINO's loss: teacher softmax((t - c) / tau_t), student log_softmax(s / tau_s), every pair but
    a view with itself, mean over pairs of the batch mean of the cross-entropy."""
    total, n = 0.0, 0
    for ti, t in enumerate(teacher):
        q = torch.softmax((t - center) / t_temp, dim=-1)
        for si, s in enumerate(student):
            if si != ti:
                total = total + (-(q * F.log_softmax(s / s_temp, dim=-1)).sum(-1)).mean()
                n += 1
    return total / n


def _oracle_masks(teacher: OracleViT, views) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (candidates [2B, L] bool: the lowest-attention RHO * L patches of each global view by the
    oracle teacher, hidden [2B, L] bool: candidates hidden with probability PROB from a fixed generator)."""
    with torch.no_grad():
        _, attn = teacher(torch.cat(views[:2]), cls_attention=True)
    L = attn.shape[1]
    rank = attn.argsort(dim=1).argsort(dim=1)
    candidates = rank < round(RHO * L)
    return candidates, candidates & (torch.rand(attn.shape, generator=_gen(5)) < PROB)


def test_mst_loss_matches_the_independent_formulation():
    m = _mst().train()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if not k.endswith("_extra_state")}
    student, teacher = OracleViT(_part(sd, "student.backbone.")), OracleViT(_part(sd, "teacher.backbone."))
    views = _views()
    candidates, hidden = _oracle_masks(teacher, views)
    assert hidden.any() and not hidden.all()
    center0 = m.dino_loss.center.clone()

    out = m(views, masks=Masks(None, None, hidden.float()))
    out["loss"].backward()

    # --- the oracle, on the same weights (head/decoder weights as leaf tensors to take gradients)
    head = {k: v.clone().requires_grad_() for k, v in _part(sd, "student.head.").items()}
    dec = {k: v.clone().requires_grad_() for k, v in sd.items() if k.startswith("decoder.")}
    mask_token = sd["mask_token"].clone().requires_grad_()
    xg = torch.cat(views[:2])
    with torch.no_grad():
        t_tok = teacher(xg)
        t_out = _head(_part(sd, "teacher.head."), "", t_tok[:, 0])
    s_glob = student(xg, mask=hidden, mask_token=mask_token)
    s_loc = student(torch.cat(views[2:]))
    s_out = _head(head, "", torch.cat([s_glob[:, 0], s_loc[:, 0]]))
    t_temp = float(np.linspace(0.04, 0.07, 5)[2])  # DINO's teacher_temp_schedule at epoch 7 // 3 = 2
    dino = _dino_ce(list(s_out.chunk(2 + N_LOCAL)), list(t_out.chunk(2)), center0, t_temp)
    rec = (_decoder(dec, s_glob[:, 1:]) - xg).abs().mean()
    loss = dino + rec
    loss.backward()

    torch.testing.assert_close(out["dino"], dino.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["rec"], rec.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
    assert out["mask_ratio"] == pytest.approx(hidden.float().mean().item())
    # the monitored entropy is that of the distribution the loss targets (tau_t, the centre before update)
    q = torch.softmax((t_out - center0) / t_temp, dim=-1)
    torch.testing.assert_close(out["teacher_entropy"], -(q * q.log()).sum(-1).mean(), rtol=1e-5, atol=1e-5)
    # the centre moved towards the teacher's batch mean after the loss (momentum 0.9)
    torch.testing.assert_close(m.dino_loss.center, 0.9 * center0 + 0.1 * t_out.mean(0, keepdim=True),
                               rtol=1e-5, atol=1e-6)
    # the student's gradients: backbone, mask token, head (the last layer past its frozen epoch), decoder
    ours = dict(m.named_parameters())
    pairs = [("student.backbone.patch_embed.proj.weight", student.patch_w),
             ("student.backbone.blocks.0.attn.qkv.weight", student.blocks[0].attn.qkv.weight),
             ("student.backbone.blocks.1.mlp.fc2.weight", student.blocks[1].mlp.fc2.weight),
             ("mask_token", mask_token),
             ("student.head.mlp.0.weight", head["mlp.0.weight"]),
             ("student.head.last_layer.weight_v", head["last_layer.weight_v"]),
             ("student.head.last_layer.weight_g", head["last_layer.weight_g"]),
             ("decoder.net.0.weight", dec["decoder.net.0.weight"])]
    for name, theirs in pairs:
        assert theirs.grad is not None and theirs.grad.abs().sum() > 0, name
        torch.testing.assert_close(ours[name].grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith("teacher."))


def test_mst_own_masks_hide_only_the_teachers_lowest_attention_patches():
    m = _mst(mask_prob=0.9)
    views = _views()
    teacher = OracleViT({k: v.detach() for k, v in _part(m.state_dict(), "teacher.backbone.").items()})
    candidates, _ = _oracle_masks(teacher, views)
    got = []
    m.masker.register_forward_hook(lambda _m, _a, out: got.append(out.mask.bool()))
    with torch.no_grad():
        m(views, keys=torch.arange(B))
    hidden = got[0]
    assert hidden.shape == candidates.shape
    assert not (hidden & ~candidates).any()              # never a patch the teacher attends to more
    assert hidden.sum() > 0.6 * candidates.sum()         # p = 0.9 of the candidates, not a handful
