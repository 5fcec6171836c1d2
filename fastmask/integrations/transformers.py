"""fastmask's fused ops inside Hugging Face's ViTMAE (`ViTMAEForPreTraining`, `ViTMAEModel`).

    from fastmask.integrations.transformers import apply_fastmask, revert_fastmask
    report = apply_fastmask(model)            # model: ViTMAEForPreTraining or ViTMAEModel
    out = model(pixel_values, noise=noise)    # same outputs, loss and masks as before, fused
    revert_fastmask(model)                    # the original forwards again

What `apply_fastmask(model, ops=..., backend="auto")` patches (instance forwards; classes, parameter
names and state_dict keys unchanged); an op left out of `ops` runs HF's own module inside the
patched forwards, or where there is none (the residual adds with their LayerNorms, the unshuffle)
its plain-PyTorch reference, the same math as HF's code:

- "patch_embed_visible" (ViTMAEEmbeddings): HF's own `random_masking` draws the mask (so `noise`,
  the RNG stream and any override of it are honoured), then only the kept patches are embedded,
  with their position embedding, by `fastmask.ops.patch_embed_visible` (HF embeds all patches, then
  gathers).
- "attention", "add_layer_norm", "bias_gelu" (ViTMAEModel's encoder, ViTMAEDecoder's layers): the
  layers run as one chain (`fastmask.models.blocks.fused_chain`) in which every residual add is fused
  with the next LayerNorm (the last one with `layernorm` / `decoder_norm`), fc1's bias with the
  GELU, and attention runs through `fastmask.ops.attention`. HF's gradient checkpointing flag
  is honoured (per-layer recomputation). With backend "auto", where bias_gelu would land on the
  plain-PyTorch reference (the CPU) HF's MLP module runs instead (the same math).
- "patch_scatter" (ViTMAEDecoder): the unshuffle (mask tokens appended, gathered with ids_restore).
- "norm_pix_loss" (ViTMAEForPreTraining): the loss through `fastmask.ops.norm_pix_loss`. HF's
  formula is the official MAE's and fastmask's: per-patch (t - mean) / sqrt(unbiased var + 1e-6)
  when `config.norm_pix_loss`, squared error averaged over the patch, then over hidden patches.
  One difference: fastmask computes it in fp32, HF in the logits' dtype (the same in fp32).

A call that asks for what the fused path does not produce runs HF's own forward (warned once):
`output_attentions` / `output_hidden_states` (argument or config), an `attention_mask`,
`interpolate_pos_encoding=True`, any other keyword argument; attention dropout > 0 in training runs
HF's attention module inside the chain. Configurations the patch cannot reproduce (activations
other than exact GELU, non-square patches or images, another layout of the layers) are left alone
and listed in the report.

The fused forwards read some submodules' weights without calling those submodules (the norms'
weights in the add+LayerNorm chain, fc1's), which DeepSpeed ZeRO stage 3 (parameters gathered
per module call) does not see: use stages 0-2 with a patched model.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from . import require
from ._patching import (PatchReport, backend_of, check_apply_args, is_patched, op_backends, patch_forward,
                        resolve, revert, run_original, warn_left_alone)
from .. import ops as fops
from ..models.blocks import fused_chain, gelu_mlp

require("transformers", "hf", "transformers")
from transformers.activations import GELUActivation  # noqa: E402
from transformers.models.vit_mae import modeling_vit_mae as _hf  # noqa: E402

ALL_OPS = ("patch_embed_visible", "attention", "add_layer_norm", "bias_gelu", "patch_scatter",
           "norm_pix_loss")
_CHAIN_OPS = ("attention", "add_layer_norm", "bias_gelu")
_INTERPOLATE = "interpolate_pos_encoding=True"


# ---------------------------------------------------------------- the encoder/decoder layers as a fused chain

def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _attention(attn: nn.Module, y: torch.Tensor, backend: str | None) -> torch.Tensor:
    """ViTMAEAttention on y [B, N, D], the product through fastmask.ops.attention (HF's without a backend)."""
    if backend is None:
        return attn(y)[0]
    if attn.training and attn.attention_dropout > 0:
        return run_original(attn, "attention dropout > 0 in training", y)[0]
    B, N, _ = y.shape
    q, k, v = (proj(y).view(B, N, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    o = fops.attention(q, k, v, scale=attn.scaling, backend=backend)
    return attn.o_proj(o.transpose(1, 2).reshape(B, N, -1))


def _call_mlp(mlp: nn.Module, y: torch.Tensor, backend: str) -> torch.Tensor:
    return mlp(y)


def _gelu_mlp(bias_gelu_backend: str, mlp: nn.Module, y: torch.Tensor, add_norm_backend: str) -> torch.Tensor:
    return gelu_mlp(mlp, y, bias_gelu_backend)


class _LayerView:
    """A ViTMAELayer under the names `fused_chain` reads (timm's): HF's dropout after each branch is
    timm's drop-path slot, and there is no layer scale."""

    def __init__(self, layer: nn.Module, backend: str):
        self.norm1, self.norm2, self.mlp = layer.layernorm_before, layer.layernorm_after, layer.mlp
        self.drop_path1 = self.drop_path2 = layer.dropout
        self.ls1 = self.ls2 = _identity
        self.attn = partial(_attention, layer.attention, backend=backend)


def _run_layers(owner: nn.Module, layers: nn.ModuleList, x: torch.Tensor, final_norm: nn.LayerNorm):
    views = [_LayerView(layer, backend_of(owner, "attention")) for layer in layers]
    exact_gelu = all(_exact_gelu(layer.mlp.activation_fn) for layer in layers)
    bias_gelu = resolve(owner, "bias_gelu", x=x, bias=layers[0].mlp.fc1.bias)
    mlp_fn = partial(_gelu_mlp, bias_gelu) if exact_gelu and bias_gelu else _call_mlp
    checkpoint = owner.training and any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
    # Without a fused add_layer_norm, the chain's adds and norms run the reference: HF's eager math.
    norm = layers[0].layernorm_before
    add_norm = resolve(owner, "add_layer_norm", x=x, residual=x, weight=norm.weight, bias=norm.bias)
    return fused_chain(views, x, final_norm, add_norm or "torch", checkpoint, mlp_fn=mlp_fn)


# ---------------------------------------------------------------- the patched forwards

def _embeddings_forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None,
                        interpolate_pos_encoding: bool = False):
    if interpolate_pos_encoding:
        return run_original(self, _INTERPOLATE, pixel_values, noise, interpolate_pos_encoding)
    pe = self.patch_embeddings
    B, C, H, W = pixel_values.shape
    if C != pe.num_channels:
        raise ValueError(f"pixel_values have {C} channels, the configuration says {pe.num_channels}")
    if (H, W) != tuple(self.image_size):
        raise ValueError(f"Input image size ({H}*{W}) doesn't match model "
                         f"({self.image_size[0]}*{self.image_size[1]}).")
    # HF's own masking on a zero-width sequence: the same noise, RNG draws, mask and ids_restore.
    kept, mask, ids_restore = self.random_masking(pixel_values.new_empty(B, pe.num_patches, 0), noise)
    ids_keep = torch.argsort(ids_restore, dim=1)[:, :kept.shape[1]]  # = HF's ids_shuffle[:, :len_keep]
    pos = self.position_embeddings
    proj = pe.projection
    x = fops.patch_embed_visible(pixel_values, ids_keep, proj.weight, proj.bias, pos[0, 1:],
                                 backend=backend_of(self, "patch_embed_visible"))
    cls = (self.cls_token + pos[:, :1]).expand(B, -1, -1)
    return torch.cat([cls, x], dim=1), mask, ids_restore


def _model_fallback_reason(model: nn.Module, attention_mask, kwargs: dict) -> str | None:
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag, getattr(model.config, flag, False)):
            return f"{flag} requested"
    if attention_mask is not None:
        return "an attention_mask argument"
    known = ("output_attentions", "output_hidden_states", "return_dict")
    extra = [k for k, v in kwargs.items() if k not in known and v is not None]
    return f"keyword arguments {extra}" if extra else None


def _model_forward(self, pixel_values: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   interpolate_pos_encoding: bool | None = None, attention_mask: torch.Tensor | None = None,
                   **kwargs):
    reason = _model_fallback_reason(self, attention_mask, kwargs)
    if reason:
        return run_original(self, reason, pixel_values, noise=noise, attention_mask=attention_mask,
                            interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    return_dict = kwargs.get("return_dict", getattr(self.config, "return_dict", True))
    x, mask, ids_restore = self.embeddings(pixel_values, noise=noise,
                                           interpolate_pos_encoding=interpolate_pos_encoding)
    x = _run_layers(self, self.layers, x, self.layernorm)
    out = _hf.ViTMAEModelOutput(last_hidden_state=x, mask=mask, ids_restore=ids_restore)
    return out if return_dict is not False else out.to_tuple()


def _decoder_forward(self, hidden_states: torch.Tensor, ids_restore: torch.Tensor,
                     interpolate_pos_encoding: bool = False):
    if interpolate_pos_encoding:
        return run_original(self, _INTERPOLATE, hidden_states, ids_restore, interpolate_pos_encoding)
    x = self.decoder_embed(hidden_states)
    # without the patch_scatter op, the reference: HF's unshuffle (append mask tokens, gather)
    tokens = fops.patch_scatter(x[:, 1:], ids_restore, self.mask_token,
                                backend=backend_of(self, "patch_scatter") or "torch")
    x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
    x = _run_layers(self, self.decoder_layers, x, self.decoder_norm)
    return _hf.ViTMAEDecoderOutput(logits=self.decoder_pred(x)[:, 1:])


def _pretraining_forward(self, pixel_values: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                         interpolate_pos_encoding: bool | None = None,
                         attention_mask: torch.Tensor | None = None, **kwargs):
    if interpolate_pos_encoding:
        return run_original(self, _INTERPOLATE, pixel_values, noise=noise, attention_mask=attention_mask,
                            interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
    enc = self.vit(pixel_values, noise=noise, interpolate_pos_encoding=interpolate_pos_encoding,
                   attention_mask=attention_mask, **kwargs)
    logits = self.decoder(enc.last_hidden_state, enc.ids_restore).logits
    loss = fops.norm_pix_loss(logits, pixel_values, enc.mask, _patch_size(self.config),
                              norm_pix=bool(self.config.norm_pix_loss),
                              backend=backend_of(self, "norm_pix_loss"))
    out = _hf.ViTMAEForPreTrainingOutput(loss=loss, logits=logits, mask=enc.mask, ids_restore=enc.ids_restore,
                                         hidden_states=enc.hidden_states, attentions=enc.attentions)
    return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------- what is supported

def _exact_gelu(act) -> bool:
    return type(act) is GELUActivation and getattr(act, "act", None) is nn.functional.gelu


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _patch_size(config) -> int:
    return _pair(config.patch_size)[0]


def _square_problem(config) -> str | None:
    p, img = _pair(config.patch_size), _pair(config.image_size)
    return None if p[0] == p[1] and img[0] == img[1] else f"non-square patches {p} or image {img}"


_LAYER_PARTS = ("layernorm_before", "layernorm_after", "dropout", "attention.q_proj", "attention.k_proj",
                "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2", "mlp.activation_fn")


def _layers_problem(layers: nn.ModuleList) -> str | None:
    for layer in layers:
        missing = [p for p in _LAYER_PARTS if _get(layer, p) is None]
        if missing:
            return f"a ViTMAELayer layout this integration does not know (no {missing}; it reads 5.x's)"
        norms = (layer.layernorm_before, layer.layernorm_after)
        if any(type(n) is not nn.LayerNorm or n.weight is None or n.bias is None for n in norms):
            return "layer norms are not LayerNorms with weight and bias"
    return None


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def _chain_plan(name: str, layers: nn.ModuleList, ops: tuple[str, ...]) -> tuple[str, list[tuple[str, str]]]:
    """What the layer chain fuses, and the (name, why) of what it leaves alone."""
    fused, left = [op for op in _CHAIN_OPS if op in ops], []
    acts = {type(a).__name__ for a in (layer.mlp.activation_fn for layer in layers) if not _exact_gelu(a)}
    if "bias_gelu" in fused and acts:
        fused.remove("bias_gelu")
        left.append((f"{name}.mlp", f"activation {', '.join(sorted(acts))} is not exact GELU"))
    return f"{len(layers)} layers as one chain ({', '.join(fused) or 'reference ops only'})", left


def _plan(model: nn.Module, ops: tuple[str, ...]):
    """[(name, module, patched forward, problem or None, what, [(name, left alone because)])] for every
    ViTMAE part of `model` that `ops` touch."""
    chain = any(op in ops for op in _CHAIN_OPS)
    plan = []
    for name, m in model.named_modules():
        if type(m) is _hf.ViTMAEEmbeddings and "patch_embed_visible" in ops:
            plan.append((name, m, _embeddings_forward, _square_problem(m.config),
                         "masking + gather + patch embedding -> fastmask.ops.patch_embed_visible", []))
        elif type(m) is _hf.ViTMAEModel and chain:
            problem = (_layers_problem(m.layers) if hasattr(m, "layers")
                       else "no `layers` (the layout of transformers < 5)")
            what, left = ("", []) if problem else _chain_plan(f"{name}.layers".lstrip("."), m.layers, ops)
            plan.append((name, m, _model_forward, problem, what, left))
        elif type(m) is _hf.ViTMAEDecoder and (chain or "patch_scatter" in ops):
            problem = _layers_problem(m.decoder_layers)
            what, left = ("", []) if problem else _chain_plan(f"{name}.decoder_layers".lstrip("."),
                                                                m.decoder_layers, ops)
            scatter = "unshuffle -> fastmask.ops.patch_scatter; " if "patch_scatter" in ops else ""
            plan.append((name, m, _decoder_forward, problem, scatter + what, left))
        elif type(m) is _hf.ViTMAEForPreTraining and "norm_pix_loss" in ops:
            plan.append((name, m, _pretraining_forward, _square_problem(m.config),
                         "reconstruction loss -> fastmask.ops.norm_pix_loss", []))
    return plan


def apply_fastmask(model: nn.Module, ops=ALL_OPS, backend: str = "auto") -> PatchReport:
    """Patch a ViTMAEForPreTraining or ViTMAEModel (or the ViTMAE parts of any model) in place -> PatchReport.

    ops: which fused ops to use (subset of ALL_OPS; the rest run HF's modules or their plain-PyTorch
    reference in the patched forwards); backend: the fastmask.ops backend for them ("auto" picks
    per device and dtype at each call; FASTMASK_BACKEND overrides). Raises one ValueError for bad
    arguments or an already patched model, TypeError when `model` holds no ViTMAE module.
    """
    ops = check_apply_args(model, ops, ALL_OPS, backend, "transformers")
    if not any(type(m) in (_hf.ViTMAEModel, _hf.ViTMAEForPreTraining) for m in model.modules()):
        raise TypeError(f"apply_fastmask: {type(model).__name__} holds no ViTMAEModel or "
                        "ViTMAEForPreTraining")
    backends = op_backends(ops, ALL_OPS, backend)
    report = PatchReport("transformers", backend, ops)
    for name, m, fwd, problem, what, left in _plan(model, ops):
        if problem:
            report.left_alone.append((name, problem))
        else:
            patch_forward(m, fwd, backends)
            report.patched.append((name, what))
            report.left_alone += left
    report.fallbacks += ["output_attentions / output_hidden_states, an attention_mask, "
                         f"{_INTERPOLATE} or another keyword argument is passed (HF's forward runs)",
                         "attention dropout > 0 in training (HF's attention module runs inside the chain)"]
    warn_left_alone(report)
    return report


def revert_fastmask(model: nn.Module) -> int:
    """Restore every forward `apply_fastmask` replaced in `model`; returns how many modules were restored."""
    return revert(model)


__all__ = ["ALL_OPS", "apply_fastmask", "revert_fastmask", "PatchReport", "is_patched"]
