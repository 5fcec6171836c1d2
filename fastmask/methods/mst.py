"""MST (Li et al., "MST: Masked Self-Supervised Transformer for Visual Representation", NeurIPS 2021,
arXiv 2106.05656): DINO self-distillation with multi-crop, plus attention-guided masking of the
student's global views and a global image decoder. See docs/methods.md, "MST" (no official code: the
MST-specific details are fastmask's [unverified] choices, configurable; the DINO part follows
facebookresearch/dino's main_dino.py).

Per step, on one batch of B images:
1. Views (DINO's multi-crop): 2 global crops (`img_size`, scale `global_crop_scale` (0.4, 1)) and
   `local_crops_number` local crops (`local_crop_size` 96 px, scale `local_crop_scale` (0.05, 0.4)),
   each a RandomResizedCrop + flip of the original image. The method declares them (`view_specs()`)
   and the loader cuts them from the decoded full-resolution image, so `forward` gets the list
   [global1, global2, local1..N]; given one batch tensor instead (synthetic data, direct calls) it
   cuts them from it on the device (`ViewAugment`'s crop). Then, on the device, DINO's
   colour pipeline per view (`ViewAugment`: jitter 0.4/0.4/0.2/0.1 p 0.8, grayscale 0.2), Gaussian
   blur (sigma in (0.1, 2)) with p `blur_p` = 1.0 / 0.1 / 0.5 for global1 / global2 / locals,
   solarization p `solarize_p` 0.2 on global2; `color_aug: false` leaves the views as they come.
2. Teacher (EMA of backbone + DINO head, cosine 0.996 -> 1, no drop-path) on the 2 global views
   only, under no_grad; a forward hook takes its last block's cls-query attention over the patches,
   averaged over heads: scores [2B, L].
3. Attention-guided masks from those scores (`masking: attention`): by default MST's Bernoulli form,
   each of the lowest-attention `mask_rho` * L patches hidden with probability `mask_prob`
   (0.5 / 0.3); `mask_mode: exact` hides exactly mask_ratio * L low-attention patches instead. Other
   generators (random, block) also work and ignore the scores. Local views are never masked.
4. Student on all 1+L tokens of both global views, hidden patches replaced by a learned mask token
   before the position embedding (`VisionTransformer.forward_masked_tokens`), and on the local
   views unmasked (the position embedding resized to their grid, DINO's interpolation).
5. Loss = w_dino * DINO(student cls -> head for all 2 + N views, teacher cls -> head for the 2
   global views; centre momentum 0.9, student temperature 0.1, teacher temperature DINO's per-epoch
   warm-up `warmup_teacher_temp` -> `teacher_temp` over `warmup_teacher_temp_epochs`; every
   (teacher view, student view) pair except a view with itself)
   + w_rec * reconstruction: the global image decoder maps the student's global patch tokens back to
   the whole (augmented, normalized) global view, L1 (or L2) averaged over every pixel, masked or not.
`freeze_last_layer` (epochs, DINO: 1): the DINO head's last layer gets no gradient during the first
epochs; the engine tells the method its epoch length (`set_epoch_length`); until then an epoch is one step.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..data import ViewSpec
from ..masking import Masks, build_masker
from ..models import create_model
from ..models.attention_probe import forward_with_cls_attention
from ..models.heads import DINOHead
from ..models.image_decoder import ImageDecoder
from ..objectives.dino import DINOLoss
from . import register_method
from ._stream import DrawStream
from .base import Method
from .momentum import cosine_momentum, ema_update_, make_teacher, teacher_mode_
from .panels import hide_patches, patch_map, rescale
from .views import ViewAugment


@register_method("mst")
class MST(Method):
    """forward(imgs, keys=None, masks=None) -> {"loss", "dino", "rec", "mask_ratio", "teacher_entropy"}.

    imgs: the views of `view_specs()`, [global1, global2, local1..N] ([B, 3, img_size, img_size] x 2,
    [B, 3, local_crop_size, local_crop_size] x N), normalized; or one batch [B, 3, img_size, img_size]
    from which the views are cut on the device. Options: `MST.Args` as keyword arguments.
    """

    @dataclasses.dataclass
    class Args:
        out_dim: int = 65536
        head_hidden_dim: int = 2048
        bottleneck_dim: int = 256
        norm_last_layer: bool = True
        student_temp: float = 0.1
        teacher_temp: float = 0.04
        warmup_teacher_temp: float = 0.04
        warmup_teacher_temp_epochs: int = 0  # DINO's ViT-S/16 300-epoch run: 0.04 -> 0.07 over 30
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
        local_crops_number: int = 8        # DINO's default (its 300-epoch ViT-S/16 run too)
        local_crop_size: int = 96
        local_crop_scale: tuple[float, float] = (0.05, 0.4)
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global1, global2, locals (DINO)
        solarize_p: float = 0.2            # global2 only (DINO)
        color_aug: bool = True             # false: views enter as they come (no jitter, blur, solarize)
        drop_path_rate: float = 0.1
        freeze_last_layer: float = 1.0     # epochs without a gradient to the head's last layer (DINO: 1)

    def __init__(self, model: str = "vit_small_patch16", img_size: int = 224, mask_ratio: float = 0.75,
                 masking: str = "attention", backend: str = "auto", seed: int = 0, **options):
        super().__init__()
        a = self.Args(**options)
        problems = []
        if a.rec_loss not in ("l1", "l2"):
            problems.append(f"rec_loss must be l1 or l2, got {a.rec_loss!r}")
        if masking == "multi":
            problems.append("masking=multi makes M masks per image; MST masks each view once")
        if a.w_dino < 0 or a.w_rec < 0 or a.w_dino + a.w_rec == 0:
            problems.append(f"w_dino and w_rec must be >= 0 and not both 0, got {a.w_dino}, {a.w_rec}")
        if a.local_crops_number < 0 or a.freeze_last_layer < 0:
            problems.append(f"local_crops_number and freeze_last_layer must be >= 0, got "
                            f"{a.local_crops_number} and {a.freeze_last_layer}")
        if problems:
            raise ValueError("mst: " + "; ".join(problems))
        if masking == "attention":
            self.masker = build_masker("attention", mask_ratio=mask_ratio, mode=a.mask_mode, prob=a.mask_prob,
                                       candidate_ratio=a.mask_rho if a.mask_mode == "bernoulli"
                                       else max(a.mask_rho, mask_ratio))
        else:
            self.masker = build_masker(masking, mask_ratio=mask_ratio)
        # dynamic_img_size: the local crops take the position embedding resized to their grid.
        def student() -> nn.ModuleDict:  # backbone + DINO head; the teacher is a second one
            backbone = create_model(model, img_size=img_size, drop_path_rate=a.drop_path_rate,
                                    backend=backend, dynamic_img_size=True)
            head = DINOHead(backbone.embed_dim, a.out_dim, a.head_hidden_dim, a.bottleneck_dim,
                            norm_last_layer=a.norm_last_layer)
            return nn.ModuleDict({"backbone": backbone, "head": head})

        self.student = student()
        backbone = self.student["backbone"]
        if a.local_crops_number and a.local_crop_size % backbone.patch_size:
            raise ValueError(f"mst: local_crop_size {a.local_crop_size} is not divisible by the patch size "
                             f"{backbone.patch_size}")
        D = backbone.embed_dim
        self.teacher = teacher_mode_(make_teacher(self.student, student), self.training)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = ImageDecoder(D, backbone.patch_size, backbone.grid_size, backbone.in_chans,
                                    width=a.decoder_width)
        self.dino_loss = DINOLoss(a.out_dim, a.student_temp, a.teacher_temp, a.warmup_teacher_temp,
                                  a.warmup_teacher_temp_epochs, a.center_momentum)
        self.args, self.img_size = a, backbone.img_size[0]
        # Per view: colour/blur/solarize for views the loader cut, and the same with the crop for one batch.
        self._augment = [self._view_augment(spec, i, cut=False) for i, spec in enumerate(self.view_specs())]
        self._cut = [self._view_augment(spec, i, cut=True) for i, spec in enumerate(self.view_specs())]
        self.step = 0
        self.stream = DrawStream(seed)

    @classmethod
    def from_config(cls, cfg, args: "MST.Args") -> "MST":
        return cls(model=cfg.model, img_size=cfg.data.img_size, mask_ratio=cfg.mask_ratio,
                   masking=cfg.masking,
                   backend=cfg.engine.backend, seed=cfg.engine.seed, **dataclasses.asdict(args))

    # ------------------------------------------------------------------ views
    def view_specs(self) -> list[ViewSpec]:
        """2 global crops (img_size, global_crop_scale) + local_crops_number local ones, DINO's multi-crop."""
        a = self.args
        g = ViewSpec(self.img_size, tuple(a.global_crop_scale))
        return [g, g] + [ViewSpec(a.local_crop_size, tuple(a.local_crop_scale))] * a.local_crops_number

    def _view_augment(self, spec: ViewSpec, i: int, cut: bool) -> ViewAugment | None:
        a = self.args
        blur = a.blur_p[min(i, 2)]
        solarize = a.solarize_p if i == 1 else 0.0
        colour = dict(blur_p=blur, solarize_p=solarize) if a.color_aug else dict(jitter_p=0.0, gray_p=0.0)
        if not cut:
            return ViewAugment(crop_scale=None, **colour) if a.color_aug else None
        return ViewAugment(crop_scale=spec.scale, crop_ratio=spec.ratio, hflip=spec.hflip, out_size=spec.size,
                           **colour)

    def _check_inputs(self, imgs: torch.Tensor | list[torch.Tensor]) -> None:
        """One ValueError naming every view that does not fit `view_specs()` (or a batch tensor that
        does not fit the model), before any work."""
        if isinstance(imgs, torch.Tensor):
            self.student["backbone"].check_images(imgs)
            problems = _size_problems(imgs, self.img_size, "imgs", imgs.shape[0])
        else:
            specs = self.view_specs()
            if len(imgs) != len(specs):
                raise ValueError(f"mst: expects {len(specs)} views (2 global + {len(specs) - 2} local) or "
                                 f"one batch tensor, got {len(imgs)} views")
            batch = imgs[0].shape[0] if isinstance(imgs[0], torch.Tensor) and imgs[0].dim() else 0
            problems = [p for i, (x, s) in enumerate(zip(imgs, specs))
                        for p in _size_problems(x, s.size, f"view {i}", batch)]
        if problems:
            raise ValueError("mst: " + "; ".join(problems))

    def _views(self, imgs: torch.Tensor | list[torch.Tensor], draws) -> list[torch.Tensor]:
        """-> the augmented views [global1, global2, local1..N] (see the class docstring)."""
        if isinstance(imgs, torch.Tensor):
            return [aug(imgs, draws=draws) for aug in self._cut]
        return [x if aug is None else aug(x, draws=draws) for x, aug in zip(imgs, self._augment)]

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True) -> "MST":
        super().train(mode)
        teacher_mode_(self.teacher, mode)
        return self

    def no_weight_decay(self) -> set[str]:
        return {f"student.backbone.{n}" for n in self.student["backbone"].no_weight_decay()} | {"mask_token"}

    def get_extra_state(self) -> dict:
        return {"stream": self.stream.state(), "step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.stream.load(state["stream"])
        self.step = int(state["step"])

    def encoder(self) -> nn.Module:
        return self.teacher["backbone"]  # DINO/MST evaluate the teacher

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (steps done // steps per epoch)."""
        return self.step // self.steps_per_epoch

    def last_layer_frozen(self) -> bool:
        """DINO's cancel_gradients_last_layer: no gradient to the head's last layer in the first epochs."""
        return self.step < round(self.args.freeze_last_layer * self.steps_per_epoch)

    # ------------------------------------------------------------------ step
    def forward(self, imgs: torch.Tensor | list[torch.Tensor], keys: torch.Tensor | None = None,
                masks: Masks | None = None) -> dict[str, torch.Tensor]:
        """imgs: see the class docstring; keys [B] int64 per-sample draw keys (None: this rank's
        counter); masks: ready Masks for the 2B student global rows (view 1 then view 2; `mask` is
        what is used) instead of drawing them."""
        a, backbone = self.args, self.student["backbone"]
        self._check_inputs(imgs)
        first = imgs if isinstance(imgs, torch.Tensor) else imgs[0]
        B = first.shape[0]
        d = self.stream.draws(B, first.device, keys)
        views = self._views(imgs, d.child("views"))
        x = torch.cat(views[:2])                                                      # [2B, C, H, W]
        with torch.no_grad():
            t_tokens, attn = forward_with_cls_attention(self.teacher["backbone"], x)
            t_out = self.teacher["head"](t_tokens[:, 0])                              # [2B, K]
        if masks is None:
            masks = self.masker(2 * B, backbone.grid_size, draws=d.child("mask").repeat(2),
                                scores=attn.mean(dim=1))
        elif masks.mask.shape[0] != 2 * B:
            raise ValueError(f"mst: masks= must hold 2B = {2 * B} rows, got {masks.mask.shape[0]}")
        s_tokens = backbone.forward_masked_tokens(x, masks.mask, self.mask_token)     # [2B, 1+L, D]
        cls = [s_tokens[:, 0]]
        if len(views) > 2:  # the local crops, unmasked, at their own resolution
            cls.append(backbone.forward_features(torch.cat(views[2:]))[:, 0])         # [N*B, D]
        head = self.student["head"]
        head.last_layer.frozen = self.last_layer_frozen()
        s_out = head(torch.cat(cls))                                                  # [(2+N)B, K]
        with torch.no_grad():  # the teacher distribution the loss targets: at tau_t, the centre before update
            t_temp = self.dino_loss.teacher_temp_at(self.epoch)
            p = torch.softmax((t_out.float() - self.dino_loss.center) / t_temp, dim=-1)
            entropy = -(p * torch.log(p + 1e-12)).sum(-1).mean()
        dino = self.dino_loss(s_out.chunk(len(views)), t_out.chunk(2), epoch=self.epoch)
        recon = self.decoder(s_tokens[:, 1:])                                         # [2B, C, H, W]
        diff = recon.float() - x.float()
        rec = diff.abs().mean() if a.rec_loss == "l1" else diff.pow(2).mean()
        loss = a.w_dino * dino + a.w_rec * rec
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
        self._check_inputs(imgs)
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
        ema_update_(self.teacher, self.student, cosine_momentum(step, total_steps, self.args.momentum))


def _size_problems(x, size: int, name: str, batch: int) -> list[str]:
    """Problems of one view x against [batch, 3, size, size] float."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        return [f"{name} must be a float [B, 3, H, W] tensor, got {got}"]
    if tuple(x.shape[1:]) != (3, size, size) or x.shape[0] != batch:
        return [f"{name} must be [{batch}, 3, {size}, {size}], got {tuple(x.shape)}"]
    return []
