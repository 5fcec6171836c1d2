"""MST (Li et al., "MST: Masked Self-Supervised Transformer for Visual Representation", NeurIPS 2021,
arXiv 2106.05656): DINO self-distillation plus attention-guided masking and a global image decoder.
See docs/methods.md, "MST" (no official code: the details are fastmask's [unverified] choices,
configurable).

Per step, on one batch of images:
1. Two global views are drawn inside the method from the batch (random resized crop at scale
   `global_crop_scale` (0.4, 1) + flip, colour jitter 0.4/0.4/0.2/0.1 p 0.8, grayscale 0.2, and
   solarize 0.2 on the second view, as DINO's global crops; Gaussian blur is left out, see
   `methods.views`). Local 96 px crops are not made: the ViT's position embedding is built for one
   image size, so multi-crop here is the 2 global crops.
2. Teacher (EMA of backbone + DINO head, cosine 0.996 -> 1, no drop-path) on both views under
   no_grad; a forward hook takes its last block's cls-query attention over the patches, averaged
   over heads: scores [2B, L].
3. Attention-guided masks from those scores (`masking: attention`): by default MST's Bernoulli form,
   each of the lowest-attention `mask_rho` * L patches hidden with probability `mask_prob`
   (0.5 / 0.3); `mask_mode: exact` hides exactly mask_ratio * L low-attention patches instead. Other
   generators (random, block) also work and ignore the scores.
4. Student on all 1+L tokens of both views, hidden patches replaced by a learned mask token before
   the position embedding (`VisionTransformer.forward_masked_tokens`).
5. Loss = w_dino * DINO(student cls -> head, teacher cls -> head; centre momentum 0.9, student
   temperature 0.1, teacher 0.04 with optional warmup from `warmup_teacher_temp` over
   `warmup_teacher_temp_steps`; cross-view pairs only)
   + w_rec * reconstruction: the global image decoder maps the student's patch tokens back to the
   whole (augmented, normalized) view, L1 (or L2) averaged over every pixel, masked or not.
`freeze_last_layer_steps`: the DINO head's last layer gets no gradient for that many steps (DINO: one epoch).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..masking import Masks, build_masker
from ..models import create_model
from ..models.attention_probe import forward_with_cls_attention
from ..models.heads import DINOHead
from ..models.image_decoder import ImageDecoder
from ..objectives.dino import DINOLoss
from . import register_method
from ._stream import DrawStream
from .base import Method
from .momentum import cosine_momentum, ema_update_, make_teacher
from .panels import hide_patches, patch_map, rescale
from .views import ViewAugment


@register_method("mst")
class MST(Method):
    """forward(imgs [B, C, H, W] normalized) -> {"loss", "dino", "rec", "mask_ratio", "teacher_entropy"} (fp32)."""

    @dataclasses.dataclass
    class Args:
        out_dim: int = 65536
        head_hidden_dim: int = 2048
        bottleneck_dim: int = 256
        norm_last_layer: bool = True
        student_temp: float = 0.1
        teacher_temp: float = 0.04
        warmup_teacher_temp: float = 0.04
        warmup_teacher_temp_steps: int = 0
        center_momentum: float = 0.9
        momentum: float = 0.996
        mask_mode: str = "bernoulli"       # bernoulli (MST: rho, p) | exact (mask_ratio, low attention first)
        mask_rho: float = 0.5              # fraction of lowest-attention patches that may be hidden
        mask_prob: float = 0.3             # probability of hiding each of them (bernoulli)
        w_dino: float = 1.0
        w_rec: float = 1.0
        rec_loss: str = "l1"               # l1 | l2, over the whole image
        decoder_width: int = 256
        global_crop_scale: tuple[float, float] = (0.4, 1.0)
        drop_path_rate: float = 0.1
        freeze_last_layer_steps: int = 0

    def __init__(self, model: str = "vit_small_patch16", img_size: int = 224, mask_ratio: float = 0.75,
                 masking: str = "attention", out_dim: int = 65536, head_hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0,
                 center_momentum: float = 0.9, momentum: float = 0.996, mask_mode: str = "bernoulli",
                 mask_rho: float = 0.5, mask_prob: float = 0.3, w_dino: float = 1.0, w_rec: float = 1.0,
                 rec_loss: str = "l1", decoder_width: int = 256, global_crop_scale: tuple[float, float] = (0.4, 1.0),
                 drop_path_rate: float = 0.1, freeze_last_layer_steps: int = 0, backend: str = "auto", seed: int = 0):
        super().__init__()
        problems = []
        if rec_loss not in ("l1", "l2"):
            problems.append(f"rec_loss must be l1 or l2, got {rec_loss!r}")
        if masking == "multi":
            problems.append("masking=multi makes M masks per image; MST masks each view once")
        if w_dino < 0 or w_rec < 0 or w_dino + w_rec == 0:
            problems.append(f"w_dino and w_rec must be >= 0 and not both 0, got {w_dino}, {w_rec}")
        if problems:
            raise ValueError("mst: " + "; ".join(problems))
        if masking == "attention":
            self.masker = build_masker("attention", mask_ratio=mask_ratio, mode=mask_mode, prob=mask_prob,
                                       candidate_ratio=mask_rho if mask_mode == "bernoulli" else max(mask_rho, mask_ratio))
        else:
            self.masker = build_masker(masking, mask_ratio=mask_ratio)
        backbone = create_model(model, img_size=img_size, drop_path_rate=drop_path_rate, backend=backend)
        D = backbone.embed_dim
        head = DINOHead(D, out_dim, head_hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = make_teacher(self.student).eval()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = ImageDecoder(D, backbone.patch_size, backbone.grid_size, backbone.in_chans, width=decoder_width)
        self.dino_loss = DINOLoss(out_dim, student_temp, teacher_temp, warmup_teacher_temp,
                                  warmup_teacher_temp_steps, center_momentum)
        self.view1 = ViewAugment(crop_scale=tuple(global_crop_scale))
        self.view2 = ViewAugment(crop_scale=tuple(global_crop_scale), solarize_p=0.2)
        self.w_dino, self.w_rec, self.rec_loss = w_dino, w_rec, rec_loss
        self.base_momentum, self.freeze_last_layer_steps = momentum, freeze_last_layer_steps
        self.step = 0
        self.student["head"].last_layer.frozen = freeze_last_layer_steps > 0
        self.stream = DrawStream(seed)

    @classmethod
    def from_config(cls, cfg, args: "MST.Args") -> "MST":
        return cls(model=cfg.model, img_size=cfg.data.img_size, mask_ratio=cfg.mask_ratio, masking=cfg.masking,
                   backend=cfg.engine.backend, seed=cfg.engine.seed, **dataclasses.asdict(args))

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True) -> "MST":
        super().train(mode)
        self.teacher.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        return {f"student.backbone.{n}" for n in self.student["backbone"].no_weight_decay()} | {"mask_token"}

    def get_extra_state(self) -> dict:
        return {"stream": self.stream.state(), "step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.stream.load(state["stream"])
        self.step = int(state["step"])
        self.student["head"].last_layer.frozen = self.step < self.freeze_last_layer_steps

    def encoder(self) -> nn.Module:
        return self.teacher["backbone"]  # DINO/MST evaluate the teacher

    # ------------------------------------------------------------------ step
    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None,
                masks: Masks | None = None) -> dict[str, torch.Tensor]:
        """imgs [B, C, H, W]; keys [B] int64 per-sample draw keys (None: this rank's counter);
        masks: ready Masks for the 2B student rows (views 1 then 2; `mask` is what is used) instead
        of drawing them."""
        backbone = self.student["backbone"]
        backbone.check_images(imgs)
        B = imgs.shape[0]
        d = self.stream.draws(B, imgs.device, keys)
        dv = d.child("views")
        x = torch.cat([self.view1(imgs, draws=dv), self.view2(imgs, draws=dv)])       # [2B, C, H, W]
        with torch.no_grad():
            t_tokens, attn = forward_with_cls_attention(self.teacher["backbone"], x)
            t_out = self.teacher["head"](t_tokens[:, 0])                            # [2B, K]
        if masks is None:
            masks = self.masker(2 * B, backbone.grid_size, draws=d.child("mask").repeat(2), scores=attn.mean(dim=1))
        elif masks.mask.shape[0] != 2 * B:
            raise ValueError(f"mst: masks= must hold 2B = {2 * B} rows, got {masks.mask.shape[0]}")
        s_tokens = backbone.forward_masked_tokens(x, masks.mask, self.mask_token)   # [2B, 1+L, D]
        s_out = self.student["head"](s_tokens[:, 0])
        dino = self.dino_loss(s_out.chunk(2), t_out.chunk(2), step=self.step)
        recon = self.decoder(s_tokens[:, 1:])                                       # [2B, C, H, W]
        diff = recon.float() - x.float()
        rec = diff.abs().mean() if self.rec_loss == "l1" else diff.pow(2).mean()
        loss = self.w_dino * dino + self.w_rec * rec
        with torch.no_grad():
            p = torch.softmax(t_out.float() - self.dino_loss.center, dim=-1)
            entropy = -(p * torch.log(p + 1e-12)).sum(-1).mean()
        return {"loss": loss, "dino": dino.detach(), "rec": rec.detach(), "mask_ratio": masks.mask.mean(),
                "teacher_entropy": entropy}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """imgs [B, 3, S, S] normalized -> panels for `fastmask visualize`, on the images themselves
        (no view augmentation): "original"; "teacher attention" [B, 1, S, S] (the teacher's
        last-block cls attention over the patches, head mean, min-max scaled per image); "mask"
        [B, 1, S, S] (the attention-guided mask, 1 = hidden); "student input" (hidden patches grey:
        the student gets the mask token there); "reconstruction" [B, 3, S, S] (the global decoder's
        image from the student's tokens)."""
        backbone = self.student["backbone"]
        backbone.check_images(imgs)
        d = self.stream.draws(imgs.shape[0], imgs.device)
        scores = forward_with_cls_attention(self.teacher["backbone"], imgs)[1].mean(dim=1)   # [B, L]
        masks = self.masker(imgs.shape[0], backbone.grid_size, draws=d.child("mask"), scores=scores)
        recon = self.decoder(backbone.forward_masked_tokens(imgs, masks.mask, self.mask_token)[:, 1:])
        p, grid = backbone.patch_size, backbone.grid_size
        return {"original": imgs, "teacher attention": patch_map(rescale(scores), grid, p),
                "mask": patch_map(masks.mask, grid, p), "student input": hide_patches(imgs, masks.mask, p),
                "reconstruction": recon.float()}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.step = step
        self.student["head"].last_layer.frozen = step < self.freeze_last_layer_steps
        ema_update_(self.teacher, self.student, cosine_momentum(step, total_steps, self.base_momentum))
