"""Under autocast the residual stream stays fp32, as in the official MAE code, for every backend.

The official model (timm blocks under torch.autocast) adds bf16 branch outputs to a stream that starts
from fp32 position embeddings, so every block's output is fp32; only the matrix products run in bf16.
Here a tiny MAE runs one forward and backward under bf16 autocast on the CPU with each backend that runs
here (torch; triton through the interpreter, which takes the fused chain: add+LayerNorm, bias+GELU,
visible patch embedding, decoder_unshuffle), and every block's residual output, and the stream that
enters the encoder's and the decoder's blocks, must be fp32, while the branch outputs are bf16 (so the
test sees autocast at work and cannot pass vacuously).
"""
import pytest
import torch

from fastmask import ops
from fastmask.models import blocks as blocks_mod
from fastmask.models.blocks import Block
from fastmask.models.mae import MaskedAutoencoderViT
from fastmask.ops import triton_backend as tb

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    "cpu" not in tb._DEVICES, reason="triton on CPU needs TRITON_INTERPRET=1"))]


class StreamRecorder:
    """Dtypes of the stream entering each block stack, of every residual output, of every branch output.

    Eager blocks are seen through module hooks; the fused chain never calls Block.forward, so its one
    residual-producing function (fastmask.models.blocks._add_norm) is wrapped instead."""

    def __init__(self, model, monkeypatch):
        self.stream_in, self.residual, self.branch = [], [], []
        for stack in (model.blocks, model.decoder_blocks):
            stack[0].register_forward_pre_hook(lambda m, args: self.stream_in.append(args[0].dtype))
            for blk in stack:
                blk.register_forward_hook(lambda m, args, out: self.residual.append(out.dtype))
        real = blocks_mod._add_norm

        def add_norm(a, h, norm, backend):
            y, h_new = real(a, h, norm, backend)
            if h is None:  # the chain's first call: `a` is the stream entering the blocks
                self.stream_in.append(a.dtype)
            else:
                self.branch.append(a.dtype)
            self.residual.append(h_new.dtype)
            return y, h_new

        monkeypatch.setattr(blocks_mod, "_add_norm", add_norm)
        for blk in [*model.blocks, *model.decoder_blocks]:
            blk.attn.register_forward_hook(lambda m, args, out: self.branch.append(out.dtype))


def _masking(B, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids_shuffle = torch.rand(B, L, generator=g).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(B, L)
    mask[:, :K] = 0
    return ids_shuffle[:, :K], ids_restore, torch.gather(mask, 1, ids_restore)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_stream_is_fp32_under_bf16_autocast(backend, monkeypatch):
    torch.manual_seed(0)
    depth, dec_depth = 1, 1
    model = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2,
                                 decoder_embed_dim=16, decoder_depth=dec_depth, decoder_num_heads=2,
                                 backend=backend)
    rec = StreamRecorder(model, monkeypatch)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids_keep, ids_restore, mask = _masking(2, 16, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(imgs, ids_keep, ids_restore)
        loss = ops.norm_pix_loss(pred, imgs, mask, 8, backend=backend)
    loss.backward()

    assert rec.stream_in == [torch.float32, torch.float32], "encoder and decoder streams must start in fp32"
    fused = backend != "torch"
    # eager: one output per block; fused chain: two residual adds per block plus the first norm's copy
    expected = (2 * depth + 1) + (2 * dec_depth + 1) if fused else depth + dec_depth
    assert len(rec.residual) == expected
    assert set(rec.residual) == {torch.float32}, f"residual outputs {rec.residual}"
    assert torch.bfloat16 in rec.branch and set(rec.branch) == {torch.bfloat16}, \
        "branch outputs must be bf16: autocast was not in effect"
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_stream_entry_matches_official_dtypes():
    """The embedding + position + cls path against the official order of work (conv embedding, + fp32
    pos_embed, cat with the fp32 cls token) under autocast: same dtype, same values to bf16 rounding."""
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, backend="torch")
    imgs = torch.randn(2, 3, 32, 32)
    ids_keep, _, _ = _masking(2, 16, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model._prepend_cls(model.embed_visible(imgs, ids_keep))
        x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 32))
        official = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
    assert official.dtype == torch.float32 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, official, atol=2e-2, rtol=2e-2)


def test_blocks_keep_an_fp32_stream_as_timm_does():
    """Our eager Block and timm's own Block, same weights, under autocast: both return the fp32 stream."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import Block as TimmBlock

    torch.manual_seed(0)
    ours, theirs = Block(32, 2), TimmBlock(32, 2, qkv_bias=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), theirs(x)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
