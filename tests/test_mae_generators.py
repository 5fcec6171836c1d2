"""MAE with every mask generator that pairs with a visible-only encoder (random, block, attention-guided,
adversarial), and a clear refusal of those that do not."""
import pytest
import torch

from fastmask.methods.mae import MAE


def _mae(masking, **kw):
    torch.manual_seed(0)
    return MAE(model="vit_tiny_patch16", img_size=32, mask_ratio=0.75, masking=masking, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=2, backend="torch", **kw)


@pytest.mark.parametrize("masking", ["random", "block", "attention", "adversarial"])
def test_mae_trains_with_each_generator(masking):
    mae = _mae(masking)
    imgs = torch.randn(3, 3, 32, 32)
    out = mae(imgs)
    assert set(out) >= {"loss", "mask_ratio"} and torch.isfinite(out["loss"])
    assert float(out["mask_ratio"]) == pytest.approx(0.75)  # exact ratio: L=4, K=1
    out["loss"].backward()
    assert mae.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if masking == "adversarial":
        # the occluder learns through the gradient reversal and its penalty, in the same backward
        occ = [p for n, p in mae.named_parameters() if n.startswith("masker.occluder")]
        assert occ and all(p.grad is not None for p in occ) and sum(p.grad.abs().sum() for p in occ) > 0


def test_attention_masks_hide_the_encoders_lowest_attention_patches():
    """In MAE's forward the scores are the encoder's own cls attention on the full image; with the
    default candidate ratio (= mask ratio) exactly the lowest-attention patches are hidden."""
    from fastmask.models.attention_probe import forward_with_cls_attention

    torch.manual_seed(0)
    mae = MAE(model="vit_tiny_patch16", img_size=64, mask_ratio=0.75, masking="attention",
              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, backend="torch")
    imgs = torch.randn(2, 3, 64, 64)
    seen = {}
    draw = mae.draw_masks

    def recording_draw(*args, **context):  # keep what the forward asked the generator, and its answer
        seen.update(context, masks=draw(*args, **context))
        return seen["masks"]

    mae.draw_masks = recording_draw
    mae(imgs)
    with torch.no_grad():
        _, attn = forward_with_cls_attention(mae.encoder_view(), imgs)
    scores = attn.mean(1)
    torch.testing.assert_close(seen["scores"], scores)
    masks = seen["masks"]
    kept_min = scores.gather(1, masks.ids_keep).min(1).values
    hidden_max = scores.masked_fill(masks.mask == 0, float("-inf")).max(1).values
    assert (kept_min >= hidden_max).all()
    assert masks.mask.sum(1).eq(12).all()


def test_mae_refuses_generators_that_do_not_fit_a_visible_only_encoder():
    with pytest.raises(ValueError, match="ExtreMA"):
        _mae("multi")
