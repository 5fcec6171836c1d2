"""patch_embed_visible: the patch embedding of the visible patches only (MAE's encoder input)."""
from __future__ import annotations

import torch

from . import reference
from ._checks import ALL_DEVICES, TORCH_DTYPES, check_images, check_index, check_index_values, fail_if
from .backends import Backend, register, select

register(Backend(op="patch_embed_visible", name="torch", fn=reference.patch_embed_visible,
                 devices=ALL_DEVICES, dtypes=TORCH_DTYPES, key_input="imgs"))


def check_patch_embed_visible(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None, pos_embed: torch.Tensor | None) -> None:
    problems = []
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        problems.append(f"weight must be a conv weight [D, C, p, p], got shape {tuple(weight.shape)}")
        fail_if("patch_embed_visible", problems)
    D, C, p = weight.shape[0], weight.shape[1], weight.shape[-1]
    problems += check_images(imgs, p)
    if not problems:
        if imgs.shape[1] != C:
            problems.append(f"imgs has {imgs.shape[1]} channels, weight expects {C}")
        problems += check_index("ids_keep", ids_keep, imgs.shape[0], imgs)
        L = (imgs.shape[-2] // p) * (imgs.shape[-1] // p)
        if not problems and not 1 <= ids_keep.shape[1] <= L:
            problems.append(f"ids_keep keeps {ids_keep.shape[1]} patches, must be in [1, L={L}]")
        if bias is not None and tuple(bias.shape) != (D,):
            problems.append(f"bias must be [D={D}], got shape {tuple(bias.shape)}")
        if pos_embed is not None and tuple(pos_embed.shape) != (L, D):
            problems.append(f"pos_embed must be [L, D] = {(L, D)} (MAE: pos_embed[0, 1:]), "
                            f"got {tuple(pos_embed.shape)}")
        for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
            if t is not None and t.device != imgs.device:
                problems.append(f"{name} is on {t.device}, imgs on {imgs.device}")
    fail_if("patch_embed_visible", problems)
    L = (imgs.shape[-2] // p) * (imgs.shape[-1] // p)
    check_index_values("patch_embed_visible", "ids_keep", ids_keep, L, permutation=False)


def patch_embed_visible(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """imgs [B, C, H, W], ids_keep [B, K] int64, weight [D, C, p, p], bias [D] | None, pos_embed [L, D] | None
    -> [B, K, D].

    The tokens MAE's encoder starts from: `(conv_p(imgs) + pos_embed)` at the kept patches, in ids_keep's
    order, with the embedding matmul run on the K visible patches only (a quarter of them at mask ratio
    0.75). weight is timm's `patch_embed.proj.weight`; pass MAE's `pos_embed[0, 1:]` (no cls slot).
    Differentiable with respect to imgs, weight, bias and pos_embed.

    Equivalent PyTorch: `fastmask.ops.reference.patch_embed_visible`.
    """
    check_patch_embed_visible(imgs, ids_keep, weight, bias, pos_embed)
    impl = select("patch_embed_visible", backend, imgs=imgs, ids_keep=ids_keep, weight=weight, bias=bias,
                  pos_embed=pos_embed)
    return impl.fn(imgs, ids_keep, weight, bias, pos_embed)
