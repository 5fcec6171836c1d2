"""ExtreMA (Wu et al., arXiv 2206.04667; microsoft/ExtreMA): extreme multi-masking with a momentum
target on the full image. See docs/methods.md, "ExtreMA".

Student: the image's M disjoint masked copies (80% x 5 by default, `masking: multi`) stacked on the
batch dimension, [M*B, n] visible tokens each, through a ViT whose class token never enters the
main blocks, two class-attention blocks (layer scale 0.1), final LayerNorm, the cls output into a
3-layer LayerNorm projector (D -> 4096 -> 4096 -> 256) and a 2-layer predictor (256 -> 4096 -> 256).
Teacher: an EMA copy of encoder + projector (no predictor) on the full, unmasked image, under
no_grad, drop-path off. Loss: BYOL's 2 - 2 cos(q, sg(k)) averaged over the M masks and the batch,
not symmetrised (the student only sees masked x1, the teacher only full x2).

Choices where the official code leaves something to the setup:
- Views: the engine's loader already applies MAE's random resized crop + flip, which ExtreMA shares
  between both views; `color_aug` (default on, the paper's best row, `--aug-spatialconsistent-color`)
  then draws two *independent* colour pipelines (jitter 0.4/0.4/0.2/0.1 p 0.8, grayscale 0.2) on
  the batch's device. color_aug off: x1 = x2. `shared_crop: false` (an ablation, not the paper's)
  gives each view its own random resized crop (scale 0.2-1) + flip of the loader's image, BYOL's
  views, so the views differ in geometry as well as colour.
- EMA: the official code updates the teacher right before computing the target with m(t); here it
  runs in `on_step_end` after each optimizer step with the cosine schedule 0.996 -> 1, which is the
  same sequence of teacher weights shifted by one step's bookkeeping.
- `masking` other than "multi" (e.g. random, block) draws M independent masks per image instead
  of disjoint ones (an ablation; the paper's default is disjoint).
- `eval_momentum` (default True, as the official linear probe): `encoder()` is the teacher's.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..masking import Masks, build_masker
from ..models import create_model
from ..models.class_attention import ClassAttentionViT
from ..models.heads import MLPHead
from ..objectives.byol import byol_loss
from . import register_method
from ._stream import DrawStream
from .base import Method
from .momentum import cosine_momentum, ema_update_, make_teacher, teacher_mode_
from .panels import hide_patches, patch_map, rescale
from .views import ViewAugment


def class_attention(encoder: ClassAttentionViT, imgs: torch.Tensor) -> torch.Tensor:
    """imgs [B, C, H, W] -> [B, heads, L] fp32: the class token's attention over the patches in the
    encoder's last class-attention block (softmax over cls + L keys, patch columns)."""
    attn = encoder.ca_blocks[-1].attn
    box: dict[str, torch.Tensor] = {}
    handle = attn.register_forward_hook(lambda _m, inputs, _out: box.__setitem__("u", inputs[0]))
    try:
        encoder.forward_features(imgs)
    finally:
        handle.remove()
    u = box["u"]                                                           # [B, 1+L, D], after norm1
    B, N, D = u.shape
    q = attn.q(u[:, :1]).float().reshape(B, attn.num_heads, attn.head_dim)
    k = attn.k(u).float().reshape(B, N, attn.num_heads, attn.head_dim)
    return (torch.einsum("bhd,bnhd->bhn", q, k) * attn.scale).softmax(dim=-1)[:, :, 1:]


@register_method("extrema")
class ExtreMA(Method):
    """forward(imgs [B, C, H, W] normalized) -> {"loss", "byol", "momentum", "target_std"} (fp32 scalars)."""

    @dataclasses.dataclass
    class Args:
        num_masks: int = 5                 # M masked copies per image (80% x 5, 90% x 8 in the paper)
        depth_ca: int = 2                  # class-attention blocks
        layer_scale_init: float = 0.1      # their layer-scale gamma init
        proj_hidden_dim: int = 4096
        proj_dim: int = 256
        pred_hidden_dim: int = 4096
        head_norm: str = "ln"              # ExtreMA's heads use LayerNorm (bn: BYOL-style)
        momentum: float = 0.996            # EMA base, cosine to 1 over the run
        drop_path_rate: float = 0.1        # student only
        color_aug: bool = True             # two independent colour pipelines on the shared crop
        shared_crop: bool = True           # false: each view its own crop + flip (BYOL's views; ablation)
        eval_momentum: bool = True         # encoder() returns the momentum encoder

    def __init__(self, model: str = "vit_base_patch16", img_size: int = 224, mask_ratio: float = 0.8,
                 masking: str = "multi", num_masks: int = 5, depth_ca: int = 2, layer_scale_init: float = 0.1,
                 proj_hidden_dim: int = 4096, proj_dim: int = 256, pred_hidden_dim: int = 4096,
                 head_norm: str = "ln", momentum: float = 0.996, drop_path_rate: float = 0.1,
                 color_aug: bool = True, shared_crop: bool = True, eval_momentum: bool = True,
                 backend: str = "auto", seed: int = 0):
        super().__init__()
        problems = []
        if masking == "attention":
            problems.append("masking=attention needs attention scores; ExtreMA's student is masked before "
                            "any teacher attention exists: use multi, random or block")
        if not 0.0 <= momentum <= 1.0:
            problems.append(f"momentum must be in [0, 1], got {momentum}")
        if num_masks < 1:
            problems.append(f"num_masks must be >= 1, got {num_masks}")
        if problems:
            raise ValueError("extrema: " + "; ".join(problems))
        self.masker = (build_masker("multi", mask_ratio=mask_ratio, num_masks=num_masks) if masking == "multi"
                       else build_masker(masking, mask_ratio=mask_ratio))

        def student() -> nn.ModuleDict:  # encoder + projector; the teacher is a second one
            vit = create_model(model, img_size=img_size, drop_path_rate=drop_path_rate, backend=backend)
            encoder = ClassAttentionViT(vit, depth_ca=depth_ca, init_values=layer_scale_init)
            projector = MLPHead(vit.embed_dim, proj_hidden_dim, proj_dim, num_layers=3, norm=head_norm)
            return nn.ModuleDict({"encoder": encoder, "projector": projector})

        self.student = student()
        if hasattr(self.masker, "num_keep"):
            # fail now on an impossible ratio x count
            self.masker.num_keep(self.student["encoder"].num_patches)
        self.predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim, num_layers=2, norm=head_norm)
        self.teacher = teacher_mode_(make_teacher(self.student, student), self.training)
        self.multi = masking == "multi"
        self.num_masks, self.base_momentum, self.eval_momentum = num_masks, momentum, eval_momentum
        self.momentum_now = momentum
        geometry = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False) if shared_crop else {}
        colour = {} if color_aug else dict(jitter_p=0.0, gray_p=0.0)
        self.augment = ViewAugment(**geometry, **colour) if color_aug or not shared_crop else None
        self.stream = DrawStream(seed)

    @classmethod
    def from_config(cls, cfg, args: "ExtreMA.Args") -> "ExtreMA":
        return cls(model=cfg.model, img_size=cfg.data.img_size, mask_ratio=cfg.mask_ratio,
                   masking=cfg.masking,
                   backend=cfg.engine.backend, seed=cfg.engine.seed, **dataclasses.asdict(args))

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True) -> "ExtreMA":
        super().train(mode)
        teacher_mode_(self.teacher, mode)
        return self

    def no_weight_decay(self) -> set[str]:
        return {f"student.encoder.{n}" for n in self.student["encoder"].no_weight_decay()}

    def get_extra_state(self) -> dict:
        return {"stream": self.stream.state()}

    def set_extra_state(self, state: dict) -> None:
        self.stream.load(state["stream"])

    def encoder(self) -> nn.Module:
        return (self.teacher if self.eval_momentum else self.student)["encoder"]

    # ------------------------------------------------------------------ step
    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None,
                masks: Masks | None = None) -> dict[str, torch.Tensor]:
        """imgs [B, C, H, W]; keys [B] int64 per-sample draw keys (None: this rank's counter);
        masks: ready Masks for the M*B student rows (row m*B + b = mask m of image b) instead of drawing."""
        enc = self.student["encoder"]
        enc.vit.check_images(imgs)
        B, M = imgs.shape[0], self.num_masks
        d = self.stream.draws(B, imgs.device, keys)
        x1, x2 = self.augment.two_views(imgs, draws=d.child("views")) if self.augment is not None \
            else (imgs, imgs)
        if masks is None:
            dm = d.child("mask")
            masks = self.masker(B, enc.grid_size, draws=dm) if self.multi else \
                self.masker(M * B, enc.grid_size, draws=dm.repeat(M))
        elif masks.ids_keep.shape[0] != M * B:
            raise ValueError(f"extrema: masks= must hold M*B = {M * B} rows, got {masks.ids_keep.shape[0]}")
        with torch.no_grad():
            k = self.teacher["projector"](self.teacher["encoder"].forward_features(x2)[:, 0])  # [B, d]
        # Row m*B + b is mask m of image b (MultiMasking's layout): repeat the batch M times to match.
        latent = enc.forward_visible(x1.repeat(M, 1, 1, 1), masks.ids_keep)                 # [M*B, 1+n, D]
        q = self.predictor(self.student["projector"](latent[:, 0]))                         # [M*B, d]
        loss = byol_loss(q, k.repeat(M, 1))  # equal-size chunks: mean over M*B = mean over masks of batch
                                             # means
        with torch.no_grad():
            target_std = torch.nn.functional.normalize(k.float(), dim=-1).std(dim=0).mean()
        return {"loss": loss, "byol": loss.detach(), "target_std": target_std,
                "momentum": imgs.new_full((), self.momentum_now, dtype=torch.float32),
                "visible_ratio": 1.0 - masks.mask.mean()}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """imgs [B, 3, S, S] normalized -> panels for `fastmask visualize`: "original"; "class
        attention" [B, 1, S, S] (the evaluated encoder's last class-attention block on the full image:
        the class token's attention over the patches, head mean, min-max scaled per image); then for
        each of the M masks "visible k" (the image with only mask k's visible patches; the masks are
        disjoint with masking=multi)."""
        enc = self.student["encoder"]
        enc.vit.check_images(imgs)
        B, M = imgs.shape[0], self.num_masks
        dm = self.stream.draws(B, imgs.device).child("mask")
        masks = self.masker(B, enc.grid_size, draws=dm) if self.multi else \
            self.masker(M * B, enc.grid_size, draws=dm.repeat(M))
        p, grid = enc.patch_size, enc.grid_size
        attn = class_attention(self.encoder(), imgs).mean(dim=1)                           # [B, L]
        panels = {"original": imgs, "class attention": patch_map(rescale(attn), grid, p)}
        for k, mask in enumerate(masks.mask.reshape(M, B, -1)):  # row m*B + b is mask m of image b
            panels[f"visible {k + 1}"] = hide_patches(imgs, mask, p)
        return panels

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.momentum_now = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update_(self.teacher, self.student, self.momentum_now)
