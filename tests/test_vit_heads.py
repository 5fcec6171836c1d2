"""Heads, class-attention pooling, the MST image decoder and the cls-attention probe."""
import pytest
import torch
import torch.nn.functional as F

from fastmask.models import create_model
from fastmask.models.attention_probe import forward_with_cls_attention
from fastmask.models.class_attention import ClassAttentionBlock, ClassAttentionViT
from fastmask.models.heads import DINOHead, MLPHead
from fastmask.models.image_decoder import ImageDecoder


def test_class_attention_block_matches_formula():
    torch.manual_seed(0)
    D, h, N, B = 48, 4, 7, 3
    blk = ClassAttentionBlock(D, h, init_values=0.1)
    x, cls = torch.randn(B, N, D), torch.randn(B, 1, D)
    u = blk.norm1(torch.cat([cls, x], 1))
    q = blk.attn.q(u[:, :1]).view(B, 1, h, D // h).transpose(1, 2)
    k = blk.attn.k(u).view(B, N + 1, h, D // h).transpose(1, 2)
    v = blk.attn.v(u).view(B, N + 1, h, D // h).transpose(1, 2)
    a = (q @ k.transpose(-1, -2) * (D // h) ** -0.5).softmax(-1) @ v
    ref = cls + 0.1 * blk.attn.proj(a.transpose(1, 2).reshape(B, 1, D))
    ref = ref + 0.1 * blk.mlp(blk.norm2(ref))
    torch.testing.assert_close(blk(x, cls), ref, rtol=1e-5, atol=1e-5)


def test_class_attention_vit_visible_equals_full_for_all_ids():
    torch.manual_seed(1)
    enc = ClassAttentionViT(create_model("vit_tiny_patch16", img_size=48), depth_ca=2).eval()
    imgs = torch.randn(2, 3, 48, 48)
    full = enc.forward_features(imgs)
    perm = torch.stack([torch.randperm(9) for _ in range(2)])
    vis = enc.forward_visible(imgs, perm)
    assert full.shape == (2, 10, 192)
    # The class token is permutation invariant; patch tokens follow ids_keep's order.
    torch.testing.assert_close(vis[:, 0], full[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vis[:, 1:], full[:, 1:].gather(1, perm[..., None].expand(-1, -1, 192)),
                               rtol=1e-4, atol=1e-4)
    # every ViT parameter that trains gets a gradient (cls_token and norm reused, nothing dangling)
    enc.train()
    enc.forward_visible(imgs, perm[:, :4])[:, 0].sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_heads_shapes_norms_and_weight_norm():
    x = torch.randn(6, 32)
    ln = MLPHead(32, 64, 16, num_layers=3, norm="ln")
    assert ln(x).shape == (6, 16) and sum(isinstance(m, torch.nn.LayerNorm) for m in ln.modules()) == 2
    bn = MLPHead(32, 64, 16, num_layers=2, norm="bn", act="relu", last_norm=True)
    assert bn(x).shape == (6, 16) and sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) == 2
    with pytest.raises(ValueError, match="norm"):
        MLPHead(32, 64, 16, norm="gn")
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=8)
    out = head(x)
    assert out.shape == (6, 100)
    # weight-normed last layer with g frozen at 1: |logit| <= 1 since both factors are unit vectors
    assert out.abs().max() <= 1.0 + 1e-5
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    out.sum().backward()
    assert head.last_layer.weight_v.grad.abs().sum() > 0


@pytest.mark.parametrize("p,grid", [(16, (2, 3)), (14, (2, 2)), (8, (3, 3))])
def test_image_decoder_shapes_and_grads(p, grid):
    dec = ImageDecoder(40, p, grid, width=32)
    t = torch.randn(2, grid[0] * grid[1], 40, requires_grad=True)
    img = dec(t)
    assert img.shape == (2, 3, grid[0] * p, grid[1] * p)
    img.abs().mean().backward()
    assert t.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="patch tokens"):
        dec(torch.randn(2, 5, 40))


def test_cls_attention_probe_matches_materialised_attention():
    torch.manual_seed(2)
    vit = create_model("vit_tiny_patch16", img_size=32).eval()
    imgs = torch.randn(3, 3, 32, 32)
    tokens, attn = forward_with_cls_attention(vit, imgs)
    torch.testing.assert_close(tokens, vit.forward_features(imgs))
    # reference: rerun up to the last block and materialise its attention matrix
    x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:]
    x = torch.cat([vit.cls_token.expand(3, -1, -1), x], 1)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    a = vit.blocks[-1].attn
    qkv = a.qkv(vit.blocks[-1].norm1(x)).view(3, 5, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    full = (qkv[0] @ qkv[1].transpose(-1, -2) * a.scale).softmax(-1)  # [B, h, N, N]
    torch.testing.assert_close(attn, full[:, :, 0, 1:], rtol=1e-5, atol=1e-6)
    assert len(vit.blocks[-1].attn.qkv._forward_hooks) == 0
