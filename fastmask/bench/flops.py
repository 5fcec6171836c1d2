"""Analytic FLOP counts of ViT encoders, the MAE decoder and a whole MAE training step, and MFU.

What is counted (the convention of the MAE/ViT literature and of docs/performance.md):

- every matrix product, as 2*M*N*K (one multiply and one add per term);
- attention's two batched products, Q K^T and P V, each 2 * N_q * N_k * D summed over heads
  (heads * head_dim = D);
- the patch embedding as the matrix product it is: 2 * patches * (p*p*C) * D;
- a training step as 3x the forward (backward = 2x forward: grads of inputs and of weights).

What is not counted: layer norms, GELU, softmax, residual adds, bias adds, the loss, the optimizer,
gathers and scatters. They are memory-bound and together well under 1% of the FLOPs at ViT sizes;
counting only matrix products keeps MFU comparable with other training stacks.

One ViT block on N tokens of width D (mlp_ratio r), written out:
    qkv   2*N*D*3D  = 6 N D^2
    QK^T  2*N*N*D   = 2 N^2 D
    PV    2*N*N*D   = 2 N^2 D
    proj  2*N*D*D   = 2 N D^2
    fc1   2*N*D*rD  = 2r N D^2
    fc2   2*N*rD*D  = 2r N D^2
    total (6 + 2 + 4r) N D^2 + 4 N^2 D     (r = 4: 24 N D^2 + 4 N^2 D)

An MAE step, by default, counts the patch embedding of all L patches, as the official code runs it
(this is the figure docs/performance.md tabulates: 58.7 / 124.5 / 291 GFLOP per image for B/L/H); a
visible-only patch embedding does less work but is judged against the same count, so the
TFLOP/s of two paths compare like their images/s.
"""
from __future__ import annotations

import dataclasses
import re

# Dense (no sparsity) peak TFLOP/s per device and dtype, from the vendors' datasheets.
# fp32 on Hopper/Ampere tensor cores means TF32 (what torch uses for fp32 matmuls only when
# torch.backends.cuda.matmul.allow_tf32 is on); the plain fp32 figure is the CUDA-core one.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


@dataclasses.dataclass(frozen=True)
class MAEShape:
    """The dimensions an MAE step's FLOPs depend on."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def len_keep(self) -> int:
        # MAE's random_masking: int(L * (1 - r)) visible patches.
        return int(self.num_patches * (1 - self.mask_ratio))


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of one pre-LN transformer block on `tokens` tokens of width `dim`."""
    n, d = tokens, dim
    hidden = int(d * mlp_ratio)
    qkv = 2 * n * d * 3 * d
    scores = 2 * n * n * d          # Q K^T, all heads
    mix = 2 * n * n * d             # P V, all heads
    proj = 2 * n * d * d
    mlp = 2 * n * d * hidden * 2
    return qkv + scores + mix + proj + mlp


def block_attention_flops(tokens: int, dim: int) -> int:
    """The part of `block_flops` spent in Q K^T and P V."""
    return 4 * tokens * tokens * dim


def patch_embed_flops(patches: int, patch_size: int, in_chans: int, dim: int) -> int:
    return 2 * patches * patch_size * patch_size * in_chans * dim


def encoder_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of `depth` blocks on `tokens` tokens (cls included by the caller)."""
    return depth * block_flops(tokens, dim, mlp_ratio)


def mae_forward_flops(s: MAEShape, all_tokens: bool = False,
                      embed_all_patches: bool = True) -> dict[str, int]:
    """Forward FLOPs of one MAE image, by part.

    all_tokens: the MAE paper's ablation: the encoder runs on all L patches (+ cls) instead of the
    visible ones. embed_all_patches: count the patch embedding of all L patches (the official
    code's conv) rather than only the visible ones.
    """
    L = s.num_patches
    enc_tokens = 1 + (L if all_tokens else s.len_keep)
    dec_tokens = 1 + L
    parts = {
        "patch_embed": patch_embed_flops(L if (embed_all_patches or all_tokens) else s.len_keep,
                                         s.patch_size, s.in_chans, s.embed_dim),
        "encoder": encoder_flops(enc_tokens, s.embed_dim, s.depth, s.mlp_ratio),
        "decoder_embed": 2 * enc_tokens * s.embed_dim * s.decoder_embed_dim,
        "decoder": encoder_flops(dec_tokens, s.decoder_embed_dim, s.decoder_depth, s.mlp_ratio),
        # The official decoder_pred runs on all L + 1 tokens, then drops cls.
        "decoder_pred": 2 * dec_tokens * s.decoder_embed_dim * s.patch_size ** 2 * s.in_chans,
    }
    parts["attention"] = (s.depth * block_attention_flops(enc_tokens, s.embed_dim)
                          + s.decoder_depth * block_attention_flops(dec_tokens, s.decoder_embed_dim))
    parts["total"] = sum(v for k, v in parts.items() if k != "attention")
    return parts


def mae_train_flops(s: MAEShape, batch: int = 1, all_tokens: bool = False,
                    embed_all_patches: bool = True) -> int:
    """FLOPs of one MAE training step (forward + backward = 3x forward) on `batch` images."""
    return 3 * batch * mae_forward_flops(s, all_tokens, embed_all_patches)["total"]


def vit_forward_flops(img_size: int, patch_size: int, embed_dim: int, depth: int,
                      mlp_ratio: float = 4.0, in_chans: int = 3) -> int:
    """Forward FLOPs of a plain ViT encoder on a whole image (cls + all patches), no head."""
    L = (img_size // patch_size) ** 2
    return (patch_embed_flops(L, patch_size, in_chans, embed_dim)
            + encoder_flops(L + 1, embed_dim, depth, mlp_ratio))


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Datasheet dense peak for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3') and dtype, or None.

    dtype: bf16 | fp16 | fp32 | tf32. Unknown devices (and every CPU) give None: pass --peak-tflops.
    """
    for key, table in PEAK_TFLOPS.items():
        if re.search(rf"\b{key}\b", device_name, flags=re.IGNORECASE):
            return table.get(dtype)
    return None


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over `peak` TFLOP/s (None when the peak is unknown)."""
    if not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * 1e12)
