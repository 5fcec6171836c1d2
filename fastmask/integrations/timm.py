"""fastmask's fused ops inside timm's VisionTransformer (and any model built from timm's `Block`).

    from fastmask.integrations.timm import apply_fastmask, revert_fastmask, forward_visible
    report = apply_fastmask(model)          # a timm VisionTransformer, or any model of timm Blocks
    print(report)                           # what was patched, what was left alone and why
    tokens = forward_visible(model, imgs, ids_keep)   # MAE-style encoder: visible patches only
    revert_fastmask(model)                  # the original forwards again

What `apply_fastmask(model, ops=..., backend="auto")` patches (instance forwards; classes, parameter
names and state_dict keys unchanged):

- "attention": each timm `Attention`: the softmax(q k^T) v product through `fastmask.ops.attention`
  (qkv, q/k norms, output norm and proj stay timm's modules). A call with `attn_mask`/`is_causal`,
  or in training with attention dropout > 0, runs timm's own forward (warned once).
- "bias_gelu": each timm `Mlp` with an exact-GELU activation and a Linear fc1 with bias: fc1's
  matmul without bias, then `fastmask.ops.bias_gelu` (drop1, norm, fc2, drop2 as timm's).
- "add_layer_norm": each timm `Block` whose norms are LayerNorms with weight and bias: the
  attention branch's residual add fused with norm2 (`fastmask.ops.add_layer_norm`); an
  `nn.Sequential` of such blocks (the ViT's `blocks`) runs as one chain in which every residual
  add is fused with the next block's norm1 too (`fastmask.models.blocks.fused_chain`; the last
  add stays plain and the model's final norm is timm's). Layer scale, drop path, qk-norm and the
  attention/MLP modules inside are called as they are.

With backend "auto", a patched Mlp or Block whose op would land on the plain-PyTorch reference
(on the CPU) runs timm's own forward: the same math without the reference's separate bias add.

Anything else (other block, attention or MLP classes, gated attention, other activations or
norms) keeps its forward and is listed in the report's `left_alone` (and one warning).

The fused forwards read some submodules' weights without calling those submodules (the norms'
weights in the add+LayerNorm chain, fc1's), which DeepSpeed ZeRO stage 3 (parameters gathered
per module call) does not see: use stages 0-2 with a patched model.
"""
from __future__ import annotations

import torch
from torch import nn

from . import require
from ._patching import (PatchReport, backend_of, check_apply_args, is_patched, op_backends, patch_forward,
                        resolve, revert, run_original, warn_left_alone)
from .. import ops as fops
from ..models.blocks import fc1_bias_gelu, fused_chain

require("timm", "timm", "timm")
import timm.layers as _layers  # noqa: E402
from timm.layers.activations import GELU as _TimmGELU  # noqa: E402
from timm.models import vision_transformer as _vit  # noqa: E402

ALL_OPS = ("attention", "bias_gelu", "add_layer_norm")
# Norm classes whose forward is exactly F.layer_norm over the last dim (timm's LayerNormFp32 computes in
# fp32 and casts back, as add_layer_norm does).
_LAYER_NORMS = tuple(c for c in (nn.LayerNorm, getattr(_layers, "LayerNorm", None),
                                 getattr(_layers, "LayerNormFp32", None)) if c is not None)


# ---------------------------------------------------------------- the patched forwards

def _attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    if attn_mask is not None or is_causal:
        extra = {"is_causal": True} if is_causal else {}
        return run_original(self, "an attn_mask or is_causal argument", x, attn_mask=attn_mask, **extra)
    if self.training and self.attn_drop.p > 0:
        return run_original(self, "attention dropout > 0 in training", x)
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    o = fops.attention(q, k, v, scale=self.scale, backend=backend_of(self, "attention"))
    o = self.norm(o.transpose(1, 2).reshape(B, N, -1))
    return self.proj_drop(self.proj(o))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    backend = resolve(self, "bias_gelu", x=x, bias=self.fc1.bias)
    if backend is None:
        return type(self).forward(self, x)
    x = fc1_bias_gelu(self, x, backend)
    return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _call_mlp(mlp: nn.Module, y: torch.Tensor, backend: str) -> torch.Tensor:
    return mlp(y)  # timm's Mlp, patched or not: the chain fuses only the adds and norms around it


def _block_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    if attn_mask is not None or is_causal:
        extra = {"is_causal": True} if is_causal else {}
        return run_original(self, "an attn_mask or is_causal argument", x, attn_mask=attn_mask, **extra)
    return _chain_or_own_forward(self, [self], x)


def _blocks_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _chain_or_own_forward(self, self, x)


def _chain_or_own_forward(module: nn.Module, blocks, x: torch.Tensor) -> torch.Tensor:
    norm = blocks[0].norm1
    backend = resolve(module, "add_layer_norm", x=x, residual=x, weight=norm.weight, bias=norm.bias)
    if backend is None:  # `auto` lands on the reference here: timm's own loop is the same math
        return type(module).forward(module, x)
    return fused_chain(blocks, x, None, backend, mlp_fn=_call_mlp)


# ---------------------------------------------------------------- what is supported

def _attention_problem(m: nn.Module) -> str | None:
    if getattr(m, "gate", None) is not None:
        return "gated attention"
    missing = [a for a in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads",
                           "head_dim", "scale") if not hasattr(m, a)]
    return f"an Attention layout this integration does not know (no {missing})" if missing else None


def _exact_gelu(act: nn.Module) -> bool:
    return (type(act) is nn.GELU and act.approximate == "none") or type(act) is _TimmGELU


def _mlp_problem(m: nn.Module) -> str | None:
    if type(m.fc1) is not nn.Linear or m.fc1.bias is None:
        return "fc1 is not a Linear with bias"
    return None if _exact_gelu(m.act) else f"activation {type(m.act).__name__} is not exact GELU"


def _layer_norm_ok(n: nn.Module) -> bool:
    if type(n) not in _LAYER_NORMS:
        return False
    return n.weight is not None and n.bias is not None and len(n.normalized_shape) == 1


def _block_problem(m: nn.Module) -> str | None:
    bad = [name for name in ("norm1", "norm2") if not _layer_norm_ok(getattr(m, name))]
    return f"{', '.join(bad)} not a LayerNorm with weight and bias" if bad else None


_TARGETS = (  # (class, op, forward, problem finder, what the report says)
    (_vit.Attention, "attention", _attention_forward, _attention_problem,
     "attention -> fastmask.ops.attention"),
    (_vit.Mlp, "bias_gelu", _mlp_forward, _mlp_problem, "fc1 bias + GELU -> fastmask.ops.bias_gelu"),
    (_vit.Block, "add_layer_norm", _block_forward, _block_problem,
     "residual add + norm2 -> fastmask.ops.add_layer_norm"),
)


def apply_fastmask(model: nn.Module, ops=ALL_OPS, backend: str = "auto") -> PatchReport:
    """Patch the timm Attention, Mlp and Block modules inside `model` (in place) -> PatchReport.

    ops: which fusions to apply (subset of ALL_OPS); backend: the fastmask.ops backend for all of
    them ("auto" picks per device and dtype at each call; FASTMASK_BACKEND overrides). Raises one
    ValueError for bad arguments or an already patched model, TypeError when `model` holds no
    timm Attention, Mlp or Block at all.
    """
    ops = check_apply_args(model, ops, ALL_OPS, backend, "timm")
    backends = op_backends(ops, ALL_OPS, backend)
    report = PatchReport("timm", backend, ops)
    fused_blocks = set()
    found = False
    for name, m in model.named_modules():
        for cls, op, fwd, problem_of, what in _TARGETS:
            if type(m) is not cls:
                continue
            found = True
            if op not in ops:
                continue
            problem = problem_of(m)
            if problem:
                report.left_alone.append((name, problem))
                continue
            patch_forward(m, fwd, backends)
            report.patched.append((name, what))
            if op == "add_layer_norm":
                fused_blocks.add(m)
    for name, m in model.named_modules():
        if type(m) is nn.Sequential and len(m) > 0 and all(b in fused_blocks for b in m):
            patch_forward(m, _blocks_forward, backends)
            report.patched.append((name, f"{len(m)} blocks as one chain: each residual add + next norm"))
    if not found:
        raise TypeError(f"apply_fastmask: {type(model).__name__} holds no timm Attention, Mlp or Block")
    if "attention" in ops:
        report.fallbacks.append("an Attention or Block gets attn_mask / is_causal, or an Attention with "
                                "attention dropout > 0 is in training")
    warn_left_alone(report)
    return report


def revert_fastmask(model: nn.Module) -> int:
    """Restore every forward `apply_fastmask` replaced in `model`; returns how many modules were restored."""
    return revert(model)


def _visible_problems(model: nn.Module, imgs: torch.Tensor, ids_keep: torch.Tensor) -> list[str]:
    if not isinstance(model, _vit.VisionTransformer):
        return [f"model must be a timm VisionTransformer, got {type(model).__name__}"]
    pe, problems = model.patch_embed, []
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding != (0, 0):
        problems.append("patch_embed.proj is not a Conv2d with kernel = stride and no padding")
    if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity):
        problems.append("patch_embed has a norm")
    if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False):
        problems.append("dynamic image size / padding")
    if model.pos_embed is None:
        problems.append("the model has no absolute position embedding")
    if model.training and not isinstance(model.patch_drop, nn.Identity):
        problems.append("patch dropout in training")
    if imgs.dim() != 4 or tuple(imgs.shape[-2:]) != tuple(pe.img_size):
        problems.append(f"imgs must be [B, C, {pe.img_size[0]}, {pe.img_size[1]}], got {tuple(imgs.shape)}")
    elif ids_keep.dim() != 2 or ids_keep.shape[0] != imgs.shape[0]:
        problems.append(f"ids_keep must be [B={imgs.shape[0]}, K], got {tuple(ids_keep.shape)}")
    return problems


def forward_visible(model: nn.Module, imgs: torch.Tensor, ids_keep: torch.Tensor, backend: str = "auto"):
    """imgs [B, C, H, W], ids_keep [B, K] int64 (visible patches, distinct per row) -> [B, P + K, D].

    MAE's encoder on a timm VisionTransformer: only the K visible patches are embedded
    (`fastmask.ops.patch_embed_visible`: patch gather + matmul with the conv weight, plus their
    position embedding), the P prefix tokens (cls, registers) are prepended with theirs, and the
    sequence runs through `model.blocks` (fused when apply_fastmask patched them) and `model.norm`.
    Equals `norm(blocks(cat(prefix, gather(patch_embed(imgs) + pos_embed, ids_keep))))`, the official
    MAE's `forward_encoder` with the masking done by the caller (mask convention: 1 = hidden).
    """
    problems = _visible_problems(model, imgs, ids_keep)
    if problems:
        raise ValueError("fastmask.integrations.timm.forward_visible: " + "; ".join(problems))
    P = model.num_prefix_tokens
    pos = model.pos_embed
    proj = model.patch_embed.proj
    patch_pos = pos[0, 0 if model.no_embed_class else P:]  # [L, D]
    x = fops.patch_embed_visible(imgs, ids_keep, proj.weight, proj.bias, patch_pos, backend=backend)
    prefix = [t for t in (model.cls_token, getattr(model, "reg_token", None)) if t is not None]
    if prefix:
        prefix = torch.cat(prefix, dim=1)
        if not model.no_embed_class:
            prefix = prefix + pos[:, :P]
        x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
    x = model.norm_pre(model.pos_drop(x))
    if model.grad_checkpointing and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq

        x = checkpoint_seq(model.blocks, x)
    else:
        x = model.blocks(x)
    return model.norm(x)


__all__ = ["ALL_OPS", "apply_fastmask", "revert_fastmask", "forward_visible", "PatchReport", "is_patched"]
