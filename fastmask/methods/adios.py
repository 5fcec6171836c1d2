"""ADIOS (Shi et al., arXiv 2201.13100, ICML 2022): an adversarial U-Net occluder hides parts of one
view, the encoder learns SimCLR / BYOL / SimSiam invariance to what is left. See docs/methods.md.

Per batch:
    x1, x2 = two augmented views                          # see "Views" below
    masks = occluder(x2)                                  # [B, N, H, W], softmax over N slots
    ssl = sum_k SSL(x1, x2 * (1 - m_k))                   # N masked views (ADIOS-s: one slot per sample)
    encoder minimizes ssl; occluder maximizes ssl - penalty(masks)
SimSiam follows the official `simsiam_adios.py`: both views are occluded (the occluder runs on each),
and per slot the loss is the mean of the enabled negative-cosine pairs: masked p vs clean z (always),
clean p vs masked z (`use_symmetry_mask`), clean vs clean (`use_no_mask`), masked vs masked
(`use_both_mask`); the U-Net has `num_blocks` 4 unless set (the official SimSiam default).

Views: two independent SimCLR-style augmentations of the original image (the official n_crops = 2,
solo-learn's pipeline: crop + flip, jitter p 0.8, grayscale 0.2, Gaussian blur p 0.5, solarization).
The method declares the two crops (`view_specs()`), the loader cuts them from the decoded
full-resolution image and `forward` gets [x1, x2] and adds the colour, blur and solarization on the
device (`views.ViewAugment`); given one batch tensor instead (synthetic data, direct calls) it cuts
both crops from it on the device.

As the official code (YugeTen/adios, `src/methods/*_adios{,_s}.py`) computes it, measured against an
independent re-statement of it in tests/test_oracle_adios.py on the same weights, views and masks:
- BatchNorm batching: every view goes through the encoder and heads as its own batch, as the official
  loop calls `encoder(x)` once per view, so BatchNorm normalizes over one view's B images. A backbone
  without BatchNorm (ViT) runs all views as one batch (per-sample, the same result) and only the heads
  go per view. (The official loop recomputes encoder(x1) for every slot; its gradient is the same, only
  the BatchNorm running statistics, used at evaluation, are updated once per phase here instead of N times.)
  All views in one BatchNorm batch, the form fastmask had before, moves the encoder's gradient by ~1.0
  relative L2 at B = 4 and was not faster on the CPU (`benchmarks/bench_adios_batches.py`: joint / per-view
  step time 1.03, ResNet-18, 32 px, batch 16, N = 4), so there is no option for it.
- Penalty (`masking.adversarial.occluder_penalty`): each (view, slot)'s batch mean of
  1/(sin(pi s) + 1e-10), summed; entropy over one view's N slots, or for SimSiam over both views'
  2N areas of a sample (per view, summed, for SimSiam-ADIOS-s).
- ADIOS-s: one slot per sample, uniform, the same slot on both views (SimSiam); the occluder's phase
  draws its own slots (the official code calls randint again). Both from `fastmask.draws`.
- The SimSiam predictor keeps the base lr (the official `static_lr`): its param group is unscheduled.

The min-max, two ways (`mode`):
- "alternating" (default, the official scheme): the engine's step trains encoder and heads on
  `ssl` with *detached* masks (the occluder is not in the engine's optimizer); then, in `post_step`,
  the occluder takes its own step on `penalty - ssl` recomputed against the *updated* encoder (its
  parameters get no gradient: `torch.autograd.grad` into the occluder only), with its own optimizer
  (`fastmask.optim.SideOptimizer`: the engine's optimizer kind, lr = the engine's scheduled lr x
  mask_lr / lr, gradients averaged over the ranks, state saved in checkpoints), on the micro-batches
  of that step. The encoder sees every batch once per phase, as the official code: BatchNorm running
  statistics are updated in both phases. The occluder steps a plain (unpartitioned) parameter set,
  so this mode supports ZeRO stages 0-2 (`supported_zero_stages`).
- "simultaneous": one pass with the masks behind a gradient reversal, `loss = ssl + penalty`; one
  backward gives the encoder dssl/dtheta and the occluder -dssl/dphi + dpenalty/dphi against the
  encoder's *pre-update* weights, one optimizer step for both (the occluder's group carries
  `lr_scale = mask_lr / lr`). Half the encoder passes; ZeRO stages 0-3.

Left as they are (not part of the SSL computation): the official online linear classifier on
detached features (it needs labels; monitoring only), its per-epoch lr steps and warmup start lr
0.003 (the engine's schedule is per step from 0), and SimSiam's bias-free Linear layers before
BatchNorm (a bias there has no effect in training mode). Features: ResNet global average pool; ViT
cls token after the final norm; its position embedding is trained (`learn_pos_embed`, as timm's ViT
that the official code uses; fastmask's ViT starts it at sin-cos). BYOL: EMA teacher (encoder +
projector) that also sees the masked view, momentum base -> 1 by cosine over the run, updated after
both phases (solo-learn).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..data import ViewSpec
from ..draws import Draws
from ..masking.adversarial import AdversarialMasking, grad_reverse, masked_copies
from ..models import create_model
from ..models import resnet as _resnet  # noqa: F401  registers resnet18 in the model registry
from ..models.heads import MLPHead
from ..models.unet import Occluder
from ..objectives.byol import byol_loss, simsiam_loss
from ..objectives.infonce import nt_xent
from ..optim import OPTIMIZERS, OptimizerSettings, SideOptimizer
from . import register_method
from ._stream import DrawStream
from .base import Method
from .momentum import cosine_momentum, ema_update_, make_teacher
from .partition import full_shape
from .views import ViewAugment

log = logging.getLogger(__name__)

SSLS = ("simclr", "byol", "simsiam")
MODES = ("alternating", "simultaneous")
# Head sizes when not given: the official argparse defaults (the scripts override some, see configs).
HEAD_DEFAULTS = {"simclr": (2048, 128, 0), "byol": (2048, 256, 512), "simsiam": (2048, 128, 512)}
SIMSIAM_UNET_BLOCKS = 4  # the official simsiam_adios{,_s}.py `--num_blocks` default


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class _Online(nn.Module):
    """imgs [B, C, H, W] -> projections [B, out]: backbone features (ResNet pool / ViT cls) -> projector."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, is_vit: bool):
        super().__init__()
        self.backbone, self.projector, self.is_vit = backbone, projector, is_vit

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(imgs)[:, 0] if self.is_vit else self.backbone(imgs)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(imgs))


@register_method("adios")
class ADIOS(Method):
    """forward(imgs) -> {"loss", "ssl_loss", "penalty", "mask_area_min", "mask_area_max"} (fp32 scalars;
    `loss` = ssl + penalty, areas are the batch means of each sample's smallest/largest slot); imgs:
    the two views of `view_specs()` [x1, x2] or one batch, each [B, 3, S, S] normalized. In alternating
    mode `loss`'s gradient is the encoder's phase only (the penalty is detached there) and
    `post_step(lr)` runs the occluder's phase.

    See the module docstring for the two modes and what follows the official code.
    """

    @dataclasses.dataclass
    class Args:
        ssl: str = "simclr"                 # simclr | byol | simsiam
        mode: str = "alternating"           # alternating (the official two optimizers) | simultaneous (half
                                            # the cost)
        num_masks: int = 4                  # N slots
        single_mask: bool = False           # ADIOS-s: one random slot per sample, penalty over all N
        alpha_sparsity: float = 1.0
        alpha_entropy: float = 0.0
        mask_fbase: int = 32
        unet_norm: str = "in"               # gn | in | none
        num_blocks: int | None = None       # U-Net depth; None = the official default (SimSiam 4, else
                                            # log2(S) - 1)
        mask_lr: float | None = None        # occluder lr (absolute; needs engine.lr); None = the encoder's lr
        temperature: float = 0.2            # SimCLR NT-Xent
        proj_hidden_dim: int | None = None  # None = HEAD_DEFAULTS[ssl]
        proj_output_dim: int | None = None
        pred_hidden_dim: int | None = None
        use_symmetry_mask: bool = True      # SimSiam: clean p vs masked z terms
        use_no_mask: bool = True            # SimSiam: clean p vs clean z terms
        use_both_mask: bool = True          # SimSiam: masked p vs masked z terms
        momentum_base: float = 0.99         # BYOL teacher EMA, cosine to 1
        small_stem: bool | None = None      # ResNet: None = small stem for img_size <= 64
        drop_path_rate: float = 0.0         # ViT backbones
        learn_pos_embed: bool = True        # ViT: train the position embedding (sin-cos init), as the
                                            # official timm ViT
        freeze_patch_embed: bool = False    # ViT: keep the patch projection at its random init (MoCo v3's
                                            # stop-grad on it, for contrastive ViTs; off in the official code)
        # extra create_model kwargs ({"depth": 2})
        backbone_args: dict = dataclasses.field(default_factory=dict)
        crop_min_scale: float = 0.08        # both views' random resized crop (solo-learn's min_scale)
        brightness: float = 0.4             # colour jitter strengths (the official scripts set them per
                                            # recipe)
        contrast: float = 0.4
        saturation: float = 0.2
        hue: float = 0.1
        jitter_p: float = 0.8
        gray_p: float = 0.2
        blur_p: float = 0.5                 # Gaussian blur, sigma in (0.1, 2) (solo-learn's gaussian_prob)
        solarize_p: float = 0.0

    def __init__(self, model: str = "resnet18", img_size: int = 96, args: "ADIOS.Args | None" = None,
                 lr: float | None = None, backend: str = "auto", seed: int = 0, optimizer: str = "adamw",
                 optimizer_settings: OptimizerSettings | None = None, weight_decay: float = 0.0):
        """lr: the engine's base lr (engine.lr), the reference of mask_lr. optimizer, optimizer_settings,
        weight_decay: the engine's (engine.optimizer ...): in alternating mode the occluder's own
        optimizer is of the same kind."""
        super().__init__()
        a = args or ADIOS.Args()
        self._check(a, lr, optimizer)
        self.args, self.model_name, self.img_size = a, model, img_size
        self.lr_scale = 1.0 if a.mask_lr is None else a.mask_lr / lr
        self.optimizer = optimizer
        self.views = 2 if a.ssl == "simsiam" else 1  # the views the occluder masks
        is_vit = not model.startswith("resnet")
        if a.freeze_patch_embed and not is_vit:
            raise ValueError(f"adios: freeze_patch_embed is a ViT option, the backbone is {model}")
        hid, out, pred = (d if d is not None else default for d, default in
                          zip((a.proj_hidden_dim, a.proj_output_dim, a.pred_hidden_dim),
                              HEAD_DEFAULTS[a.ssl]))

        def online() -> _Online:  # backbone + projector; the BYOL teacher is a second one
            if is_vit:
                backbone = create_model(model, img_size=img_size, drop_path_rate=a.drop_path_rate,
                                        backend=backend, **a.backbone_args)
                backbone.pos_embed.requires_grad_(a.learn_pos_embed)
                backbone.patch_embed.requires_grad_(not a.freeze_patch_embed)
            else:
                backbone = create_model(model, img_size=img_size, small_stem=a.small_stem, **a.backbone_args)
            dim = backbone.num_features if hasattr(backbone, "num_features") else backbone.embed_dim
            if a.ssl == "simclr":
                projector = MLPHead(dim, hid, out, num_layers=2, norm="none", act="relu")
            elif a.ssl == "byol":
                projector = MLPHead(dim, hid, out, num_layers=2, norm="bn", act="relu")
            else:  # SimSiam: 3 layers, BN, BN without affine on the output
                projector = MLPHead(dim, hid, out, num_layers=3, norm="bn", act="relu", last_norm=True)
            return _Online(backbone, projector, is_vit)

        self.online = online()
        self.predictor = MLPHead(out, pred, out, num_layers=2, norm="bn", act="relu") \
            if a.ssl != "simclr" else None
        self.teacher = make_teacher(self.online, online) if a.ssl == "byol" else None
        blocks = a.num_blocks if a.num_blocks is not None else (SIMSIAM_UNET_BLOCKS if a.ssl == "simsiam"
                                                                else None)
        self.masker = AdversarialMasking(
            occluder=Occluder(img_size, num_masks=a.num_masks, fbase=a.mask_fbase, norm=a.unet_norm,
                              num_blocks=blocks),
            alpha_sparsity=a.alpha_sparsity, alpha_entropy=a.alpha_entropy)
        colour = dict(brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue,
                      jitter_p=a.jitter_p, gray_p=a.gray_p, blur_p=a.blur_p, solarize_p=a.solarize_p)
        # crops cut here, from one batch
        self.augment = ViewAugment(crop_scale=(a.crop_min_scale, 1.0), **colour)
        self.colour = ViewAugment(crop_scale=None, **colour)                     # for the loader's crops
        self._stream = DrawStream(seed)
        self._backbone_bn = _has_batchnorm(self.online.backbone)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, Draws]] = []  # this step's views, for post_step
        if a.mode == "alternating":
            groups = self._split_groups(weight_decay)[1]
            self.occluder_opt = SideOptimizer(groups, optimizer, optimizer_settings or OptimizerSettings())
        log.info("ADIOS%s: ssl=%s, backbone=%s, N=%d, mode=%s (%s)", "-s" if a.single_mask else "", a.ssl,
                 model, a.num_masks, a.mode,
                 "the occluder's own step after the engine's, against the updated encoder"
                 if a.mode == "alternating" else "one pass, gradient reversal into the occluder")

    @staticmethod
    def _check(a: "ADIOS.Args", lr: float | None, optimizer: str) -> None:
        problems = []
        if a.ssl not in SSLS:
            problems.append(f"ssl must be one of {SSLS}, got {a.ssl!r}")
        if a.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {a.mode!r}")
        if a.num_masks < 1 or (a.num_masks < 2 and not a.single_mask):
            problems.append(f"num_masks must be >= 2 (>= 1 with single_mask), got {a.num_masks}")
        if a.mask_lr is not None and (lr is None or lr <= 0 or a.mask_lr < 0):
            problems.append("mask_lr needs a positive engine.lr to scale against (ADIOS does not batch-scale "
                            f"its lr: set engine.lr), got mask_lr={a.mask_lr}, lr={lr}")
        if not 0.0 <= a.momentum_base <= 1.0:
            problems.append(f"momentum_base must be in [0, 1], got {a.momentum_base}")
        if a.temperature <= 0:
            problems.append(f"temperature must be > 0, got {a.temperature}")
        if optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if problems:
            raise ValueError("adios: " + "; ".join(problems))

    @classmethod
    def from_config(cls, cfg, args: "ADIOS.Args") -> "ADIOS":
        if cfg.masking != "adversarial":
            raise ValueError("adios: masks come from its own occluder; set masking=adversarial (got "
                             f"{cfg.masking!r})")
        e = cfg.engine
        return cls(model=cfg.model, img_size=cfg.data.img_size, args=args, lr=e.lr, backend=e.backend,
                   seed=e.seed, optimizer=e.optimizer, optimizer_settings=OptimizerSettings.of(e),
                   weight_decay=e.weight_decay)

    @classmethod
    def supported_zero_stages(cls, args: "ADIOS.Args") -> tuple[int, ...]:
        return (0, 1, 2) if args.mode == "alternating" else (0, 1, 2, 3)

    @classmethod
    def zero_stage_problem(cls, args: "ADIOS.Args", stage: int) -> str | None:
        if stage in cls.supported_zero_stages(args):
            return None
        return ("mode=alternating steps the occluder with its own optimizer on whole parameters, which "
                "ZeRO-3 partitions; use engine.zero_stage <= 2 or method_args.mode=simultaneous")

    # ------------------------------------------------------------------ views
    def view_specs(self) -> list[ViewSpec]:
        """Two crops of the original image, both (img_size, (crop_min_scale, 1)) with a flip."""
        spec = ViewSpec(self.img_size, (self.args.crop_min_scale, 1.0))
        return [spec, spec]

    def _views(self, imgs: torch.Tensor | list[torch.Tensor],
               draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the two augmented views (x1, x2), each [B, 3, S, S]."""
        if isinstance(imgs, torch.Tensor):
            return self.augment.two_views(imgs, draws=draws)
        return self.colour(imgs[0], draws=draws), self.colour(imgs[1], draws=draws)

    def _check_inputs(self, imgs: torch.Tensor | list[torch.Tensor]) -> int:
        """-> B; one ValueError for inputs that are not one batch or the two views [B, 3, S, S]."""
        S, views = self.img_size, [imgs] if isinstance(imgs, torch.Tensor) else list(imgs)
        bad = [f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
               for x in views if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1:] != (3, S, S)
               or not x.is_floating_point()]
        if bad or len(views) != (1 if isinstance(imgs, torch.Tensor) else 2) \
                or len({x.shape[0] for x in views}) != 1:
            raise ValueError(f"adios: imgs must be one float batch [B, 3, {S}, {S}] or its two views (a list "
                             f"of two), got {len(views)} tensor(s)"
                             f"{': ' + ', '.join(bad) if bad else ' of different B'}")
        if views[0].shape[0] < 2:
            raise ValueError("adios: the contrastive/BatchNorm objectives need a batch of at least 2 images")
        return views[0].shape[0]

    # ------------------------------------------------------------------ randomness (views, ADIOS-s slots)
    @property
    def draws(self) -> int:
        """How many keyless draws this rank made (direct calls without `keys`, see `_stream`)."""
        return self._stream.draws_done

    @draws.setter
    def draws(self, value: int) -> None:
        self._stream.draws_done = int(value)

    def get_extra_state(self) -> dict:
        return self._stream.state()

    def set_extra_state(self, state: dict) -> None:
        self._stream.load(state)

    # ------------------------------------------------------------------ the SSL loss on masked views
    def _select(self, masks: torch.Tensor, draws: Draws) -> torch.Tensor:
        """masks [V*B, N, H, W] -> the masks applied [K, V*B, H, W]: all N slots, or (ADIOS-s) one slot
        per sample, the same on each of its V views."""
        if not self.args.single_mask:
            return masks.transpose(0, 1)
        rows, N = masks.shape[:2]
        slot = draws.randint(N).to(masks.device).repeat(self.views)
        return masks[torch.arange(rows, device=masks.device), slot].unsqueeze(0)

    def _embed(self, net: _Online, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """views: V batches [B, C, H, W] -> V projections [B, d], each view its own BatchNorm batch."""
        B = views[0].shape[0]
        if self._backbone_bn:
            feats = [net.features(v) for v in views]
        else:  # no batch statistics in the backbone: one call, the same per-sample result
            feats = net.features(torch.cat(views)).split(B)
        return [net.projector(f) for f in feats]

    def _predict(self, z: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.predictor(zi) for zi in z]

    def _ssl(self, x1: torch.Tensor, x2: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """x1, x2 [B, C, H, W]; sel [K, B, H, W] masks on x2 (SimSiam: [K, 2B, H, W], x1's masks first)
        -> the SSL loss summed over the K masks."""
        a, B, K = self.args, x1.shape[0], sel.shape[0]
        if a.ssl == "simsiam":
            views = [x1, x2, *masked_copies(x1, sel[:, :B]).split(B), *masked_copies(x2, sel[:, B:]).split(B)]
        else:
            views = [x1, *masked_copies(x2, sel).split(B)]
        z = self._embed(self.online, views)
        if a.ssl == "simclr":
            return sum(nt_xent(z[0], z[1 + k], a.temperature) for k in range(K))
        p = self._predict(z)
        if a.ssl == "byol":
            with torch.no_grad():
                t = self._embed(self.teacher, views)
            return sum(byol_loss(p[0], t[1 + k]) + byol_loss(p[1 + k], t[0]) for k in range(K))
        total = 0
        for k in range(K):  # the official pairs, averaged per slot, summed over slots
            m1, m2 = 2 + k, 2 + K + k
            pairs = [(m1, 1), (m2, 0)]                                    # masked p, clean z
            if a.use_symmetry_mask:
                pairs += [(1, m1), (0, m2)]                               # clean p, masked z
            if a.use_no_mask:
                pairs += [(0, 1), (1, 0)]                                 # no mask
            if a.use_both_mask:
                pairs += [(m1, m2), (m2, m1)]                             # both masked
            total = total + torch.stack([simsiam_loss(p[i], z[j]) for i, j in pairs]).mean()
        return total

    def _masks(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """-> soft masks [V*B, N, H, W] of the occluded views (x2; SimSiam: x1 then x2)."""
        return self.masker.pixel_masks(torch.cat([x1, x2]) if self.views == 2 else x2)

    def _penalty(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # SimSiam-ADIOS takes the entropy's softmax over both views' 2N areas, SimSiam-ADIOS-s per view.
        return self.masker.penalty(masks, self.views, joint_entropy=not self.args.single_mask)

    # ------------------------------------------------------------------ method interface
    def forward(self, imgs: torch.Tensor | list[torch.Tensor], keys: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """imgs: [x1, x2] (the loader's crops) or one batch, [B, 3, S, S] normalized; keys [B] int64
        per-sample draw keys (None: this rank's counter)."""
        B = self._check_inputs(imgs)
        first = imgs if isinstance(imgs, torch.Tensor) else imgs[0]
        d = self._stream.draws(B, first.device, keys)
        x1, x2 = self._views(imgs, d.child("views"))
        if self.args.mode == "simultaneous":
            masks = self._masks(x1, x2)
            penalty, areas = self._penalty(masks)
            ssl = self._ssl(x1, x2, grad_reverse(self._select(masks, d.child("slots"))))
            loss = ssl + penalty
        else:
            with torch.no_grad():  # the encoder's phase: masks detached, as the official inpaint_forward
                masks = self._masks(x1, x2)
                penalty, areas = self._penalty(masks)
            ssl = self._ssl(x1, x2, self._select(masks, d.child("slots")))
            loss = ssl + penalty
            if self.training and torch.is_grad_enabled():
                self._pending.append((x1, x2, d.child("occluder_slots")))
        return {"loss": loss, "ssl_loss": ssl.detach(), "penalty": penalty.detach(),
                "mask_area_min": areas.min(dim=1).values.mean(),
                "mask_area_max": areas.max(dim=1).values.mean()}

    def occluder_loss(self, x1: torch.Tensor, x2: torch.Tensor, draws: Draws) -> torch.Tensor:
        """The occluder's objective on fixed views, with the encoder as it is now: penalty - ssl (fp32
        scalar; the official mask_forward's -m_loss). draws: the ADIOS-s slot draws."""
        masks = self._masks(x1, x2)
        return self._penalty(masks)[0] - self._ssl(x1, x2, self._select(masks, draws))

    def post_step(self, lr: float) -> None:
        """Alternating mode: the occluder's step on the micro-batches of the step just taken, against
        the updated encoder; gradient into the occluder only, averaged over micro-batches and ranks."""
        pending, self._pending = self._pending, []
        if self.args.mode != "alternating" or not pending:
            return
        params = self.occluder_opt.params
        total = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for x1, x2, draws in pending:
                grads = torch.autograd.grad(self.occluder_loss(x1, x2, draws) / len(pending), params,
                                            allow_unused=True)
                torch._foreach_add_(total, [torch.zeros_like(p) if g is None else g
                                            for p, g in zip(params, grads)])
        self.occluder_opt.step(total, lr)

    def on_step_end(self, step: int, total_steps: int) -> None:
        if self.teacher is not None:
            ema_update_(self.teacher, self.online,
                        cosine_momentum(step, total_steps, self.args.momentum_base, 1.0))

    def _split_groups(self, weight_decay: float) -> tuple[list[dict], list[dict]]:
        """-> (encoder + heads groups, occluder groups). Weight decay skips 1-D parameters (biases,
        norms), which the official LARS also leaves unadapted (exclude_bias_n_norm); with Adam-type
        optimizers also the backbone's no_weight_decay names (timm's rule). The occluder's groups
        carry lr_scale = mask_lr / lr; the SimSiam predictor's group is unscheduled (official static_lr)."""
        adam = self.optimizer in ("adamw", "apex_fused_adam")
        skip = {f"online.backbone.{n}" for n in getattr(self.online.backbone, "no_weight_decay", set)()} \
            if adam else set()
        buckets: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            occ = name.startswith("masker.")
            fixed = self.args.ssl == "simsiam" and name.startswith("predictor.")
            decay = len(full_shape(p)) > 1 and name not in skip  # the real shape at ZeRO-3
            buckets.setdefault((occ, fixed, decay), []).append(p)
        encoder, occluder = [], []
        for (occ, fixed, decay), params in sorted(buckets.items()):
            g = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if occ:
                g.update(lr_scale=self.lr_scale, name="occluder")
            if fixed:
                g.update(scheduled=False, name="predictor")
            (occluder if occ else encoder).append(g)
        return encoder, occluder

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The engine's groups: encoder + heads (+ the occluder in simultaneous mode), see `_split_groups`.
        In alternating mode the occluder's groups go to its own optimizer instead (same weight decay)."""
        encoder, occluder = self._split_groups(weight_decay)
        if self.args.mode == "alternating":
            self.occluder_opt.set_groups(occluder)
            return encoder
        return encoder + occluder

    def encoder(self) -> nn.Module:
        return self.online.backbone

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """imgs [B, 3, S, S] normalized -> panels for `fastmask visualize`: "original" [B, 3, S, S],
        then per slot k "mask k" [B, S, S] in [0, 1] (1 = hidden) and "hide k" [B, 3, S, S] (the
        image with slot k hidden, what the encoder sees)."""
        masks = self.masker.pixel_masks(imgs).float()             # [B, N, S, S]
        hidden = masked_copies(imgs, masks.transpose(0, 1).to(imgs.dtype)).unflatten(
            0, (masks.shape[1], imgs.shape[0]))
        panels = {"original": imgs}
        for k in range(masks.shape[1]):
            panels[f"mask {k}"] = masks[:, k]
            panels[f"hide {k}"] = hidden[k]
        return panels
