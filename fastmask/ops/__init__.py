"""fastmask.ops: the public fused ops, one function each, with backend dispatch.

    patch_gather(imgs, ids_keep, patch_size)          -> visible patches [B, K, p*p*C]
    patch_scatter(tokens, ids_restore, mask_token)    -> unshuffled tokens [B, L, D]
    decoder_unshuffle(x, ids_restore, mask_token, pos_embed) -> MAE's decoder input [B, 1+L, D]
    norm_pix_loss(pred, imgs, mask, patch_size)       -> scalar (MAE's normalized-pixel loss)
    attention(q, k, v)                                -> [B, heads, N, head_dim]
    add_layer_norm(x, residual, weight, bias)         -> (LayerNorm(x + residual), x + residual)
    bias_gelu(x, bias)                                -> GELU(x + bias)

Every op takes `backend="auto" | "torch" | "triton" | "cuda"` (attention also "sdpa", "xformers");
the FASTMASK_BACKEND environment variable sets the default. FASTMASK_CHECK=1 also validates the
values of index tensors (distinct ids_keep entries, ids_restore permutations: a host sync, so off by
default). `fastmask.ops.reference` holds the plain-PyTorch versions. This package imports nothing
from the rest of the engine.
"""
from .attention import attention
from . import backends
from .backends import BackendUnavailable, backends_for, explain, select
from .bias_gelu import bias_gelu
from .decoder_unshuffle import decoder_unshuffle
from .layer_norm import add_layer_norm
from .norm_pix_loss import norm_pix_loss
from .patch_embed import patch_embed_visible
from .patch_gather import patch_gather
from .patch_scatter import patch_scatter

__all__ = ["patch_gather", "patch_scatter", "decoder_unshuffle", "norm_pix_loss", "attention",
           "add_layer_norm", "bias_gelu", "patch_embed_visible", "BackendUnavailable",
           "backends_for", "explain", "select"]

# Register the triton/cuda/xformers records now, at import, not on the first call: a first call
# inside a torch.compile region would otherwise import modules under Dynamo (a graph break).
backends._load_optional_backends()
