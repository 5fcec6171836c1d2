"""ADIOS (Shi et al., arXiv 2201.13100, ICML 2022): an adversarial U-Net occluder hides parts of one
view, the encoder learns SimCLR / BYOL / SimSiam invariance to what is left. See docs/methods.md.

Per batch (the engine yields one normalized batch; the two views are made here, `views.ViewAugment`):
    x1, x2 = two augmented views
    masks = occluder(x2)                                  # [B, N, H, W], softmax over N slots
    ssl = sum_k SSL(x1, x2 * (1 - m_k))                   # N masked views (ADIOS-s: one slot per sample)
    encoder minimizes ssl; occluder maximizes ssl - penalty(masks)
SimSiam follows the official `simsiam_adios.py`: both views are occluded and the loss is the mean of
8 negative-cosine terms per slot (masked p vs clean z, clean p vs masked z, clean/clean, masked/masked).

Two ways to fit the min-max into the engine's single optimizer step (`mode`):
- "simultaneous": one encoder pass over [x1; masked views] with the masks behind a gradient reversal;
  `loss = ssl + penalty`. One backward gives the encoder dssl/dtheta and the occluder
  -dssl/dphi + dpenalty/dphi.
- "alternating" (default, the paper's two phases): phase 1 = ssl with *detached* masks (encoder
  gradient only); phase 2 = ssl again, through the encoder called with *detached parameters*
  (`torch.func.functional_call`, no requires_grad toggling, so DeepSpeed's grad hooks see nothing
  odd) and reversed masks (occluder gradient only), plus the penalty. `loss = ssl1 + penalty +
  (ssl2 - sg(ssl2))`: its value is ssl1 + penalty, one backward gives each parameter set its own
  phase's gradient. This equals the official alternation except that the occluder sees the encoder's
  pre-update weights (the official code steps the encoder optimizer between the phases). Phase 2
  re-runs the whole encoder batch, as the official code does, so BatchNorm statistics match phase 1.
  Consequence worth knowing: with all N slots, phase 2's gradient equals the reversed gradient of
  phase 1, so "alternating" gives *the same gradients* as "simultaneous" at twice the encoder cost
  (BatchNorm running statistics are updated twice, as in the official code); with single_mask
  (ADIOS-s) phase 2 draws its own slots, as the official code does, and the two modes differ.
  `alternating` needs unpartitioned parameters (ZeRO stage <= 2).

Choices (the official code is Lightning + two optimizers; solo-learn heads):
- The N masked views go through the encoder as one batch with view 1 ([x1; x2 m_1; ...; x2 m_N],
  (N+1)B images): BatchNorm statistics are over that batch instead of per slot (the official loop
  runs one (x1, x2 m_k) pair at a time). Losses are per slot as in the paper and summed over slots.
- The occluder's lr is `mask_lr` through a param group carrying `lr_scale = mask_lr / lr`: the
  engine's schedule multiplies each group's lr by `group.get("lr_scale", 1.0)`.
- Features: ResNet global average pool; ViT cls token after the final norm.
- BYOL: symmetrised 2 - 2cos with an EMA teacher (encoder + projector) that also sees the masked
  view; momentum base -> 1 by cosine over the run, updated after each optimizer step (solo-learn).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from torch.func import functional_call

from ..draws import Draws
from ..masking.adversarial import AdversarialMasking, grad_reverse, masked_copies, pick_slots
from ..models import create_model
from ..models import resnet as _resnet  # noqa: F401  registers resnet18 in the model registry
from ..models.heads import MLPHead
from ..models.unet import Occluder
from ..objectives.byol import byol_loss, simsiam_loss
from ..objectives.infonce import nt_xent
from . import register_method
from .base import Method
from ._stream import DrawStream
from .momentum import cosine_momentum, ema_update_, make_teacher
from .views import ViewAugment

log = logging.getLogger(__name__)

SSLS = ("simclr", "byol", "simsiam")
MODES = ("alternating", "simultaneous")
# Head sizes when not given: the official argparse defaults (the scripts override some, see configs).
HEAD_DEFAULTS = {"simclr": (2048, 128, 0), "byol": (2048, 256, 512), "simsiam": (2048, 128, 512)}


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
    """forward(imgs [B, 3, S, S] normalized) -> {"loss", "ssl_loss", "penalty", "mask_area_min",
    "mask_area_max"} (fp32 scalars; areas are the batch means of each sample's smallest/largest slot).

    See the module docstring for the two modes and the choices made.
    """

    @dataclasses.dataclass
    class Args:
        ssl: str = "simclr"                 # simclr | byol | simsiam
        mode: str = "alternating"           # alternating (paper's two phases) | simultaneous (half the cost)
        num_masks: int = 4                  # N slots
        single_mask: bool = False           # ADIOS-s: one random slot per sample, penalty over all N
        alpha_sparsity: float = 1.0
        alpha_entropy: float = 0.0
        mask_fbase: int = 32
        unet_norm: str = "in"               # gn | in | none
        mask_lr: float | None = None        # occluder lr (absolute; needs engine.lr); None = the encoder's lr
        temperature: float = 0.2            # SimCLR NT-Xent
        proj_hidden_dim: int | None = None  # None = HEAD_DEFAULTS[ssl]
        proj_output_dim: int | None = None
        pred_hidden_dim: int | None = None
        momentum_base: float = 0.99         # BYOL teacher EMA, cosine to 1
        small_stem: bool | None = None      # ResNet: None = small stem for img_size <= 64
        drop_path_rate: float = 0.0         # ViT backbones
        backbone_args: dict = dataclasses.field(default_factory=dict)  # extra create_model kwargs ({"depth": 2})
        crop_min_scale: float = 0.2         # the in-method random resized crop of both views
        jitter_p: float = 0.8
        gray_p: float = 0.2
        solarize_p: float = 0.0

    def __init__(self, model: str = "resnet18", img_size: int = 96, args: "ADIOS.Args | None" = None,
                 lr: float | None = None, backend: str = "auto", seed: int = 0):
        super().__init__()
        a = args or ADIOS.Args()
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
        if problems:
            raise ValueError("adios: " + "; ".join(problems))
        self.args, self.model_name, self.img_size = a, model, img_size
        self.lr_scale = 1.0 if a.mask_lr is None else a.mask_lr / lr
        is_vit = not model.startswith("resnet")
        if is_vit:
            backbone = create_model(model, img_size=img_size, drop_path_rate=a.drop_path_rate, backend=backend,
                                    **a.backbone_args)
        else:
            backbone = create_model(model, img_size=img_size, small_stem=a.small_stem, **a.backbone_args)
        dim = backbone.num_features if hasattr(backbone, "num_features") else backbone.embed_dim
        hid, out, pred = (d if d is not None else default for d, default in
                          zip((a.proj_hidden_dim, a.proj_output_dim, a.pred_hidden_dim), HEAD_DEFAULTS[a.ssl]))
        if a.ssl == "simclr":
            projector = MLPHead(dim, hid, out, num_layers=2, norm="none", act="relu")
        elif a.ssl == "byol":
            projector = MLPHead(dim, hid, out, num_layers=2, norm="bn", act="relu")
        else:  # SimSiam: 3 layers, BN, BN without affine on the output
            projector = MLPHead(dim, hid, out, num_layers=3, norm="bn", act="relu", last_norm=True)
        self.online = _Online(backbone, projector, is_vit)
        self.predictor = MLPHead(out, pred, out, num_layers=2, norm="bn", act="relu") if a.ssl != "simclr" else None
        self.teacher = make_teacher(self.online) if a.ssl == "byol" else None
        self.masker = AdversarialMasking(
            occluder=Occluder(img_size, num_masks=a.num_masks, fbase=a.mask_fbase, norm=a.unet_norm),
            alpha_sparsity=a.alpha_sparsity, alpha_entropy=a.alpha_entropy)
        self.augment = ViewAugment(crop_scale=(a.crop_min_scale, 1.0), jitter_p=a.jitter_p, gray_p=a.gray_p,
                                   solarize_p=a.solarize_p)
        self._stream = DrawStream(seed)
        log.info("ADIOS%s: ssl=%s, backbone=%s, N=%d, mode=%s (%s)", "-s" if a.single_mask else "", a.ssl, model,
                 a.num_masks, a.mode, "two phases in one step, 2x encoder passes" if a.mode == "alternating"
                 else "one pass, gradient reversal into the occluder")

    @classmethod
    def from_config(cls, cfg, args: "ADIOS.Args") -> "ADIOS":
        if cfg.masking != "adversarial":
            raise ValueError(f"adios: masks come from its own occluder; set masking=adversarial (got {cfg.masking!r})")
        if args.mode == "alternating" and cfg.engine.zero_stage == 3:
            raise ValueError("adios: mode=alternating calls the encoder with detached parameters, which ZeRO-3 "
                             "partitions away; use engine.zero_stage <= 2 or method_args.mode=simultaneous")
        return cls(model=cfg.model, img_size=cfg.data.img_size, args=args, lr=cfg.engine.lr,
                   backend=cfg.engine.backend, seed=cfg.engine.seed)

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
        """masks [Bx, N, H, W] -> the masks applied [K, Bx, H, W]: all N slots, or one per sample (ADIOS-s)."""
        if self.args.single_mask:
            return pick_slots(masks, draws=draws)[0].unsqueeze(0)
        return masks.transpose(0, 1)

    def _ssl(self, x1: torch.Tensor, x2: torch.Tensor, sel: torch.Tensor, detached: bool) -> torch.Tensor:
        """x1, x2 [B, C, H, W]; sel [K, B, H, W] (SimSiam: [K, 2B, H, W], view 1's masks first)
        -> the SSL loss summed over the K masks. detached: encoder/heads run with detached
        parameters (phase 2), so only the masks receive gradient."""
        B, K, ssl = x1.shape[0], sel.shape[0], self.args.ssl
        if ssl == "simsiam":
            batch = torch.cat([x1, x2, masked_copies(x1, sel[:, :B]), masked_copies(x2, sel[:, B:])])
        else:
            batch = torch.cat([x1, masked_copies(x2, sel)])
        z = self._call(self.online, batch, detached)
        if ssl == "simclr":
            z1, z2 = z[:B], z[B:].unflatten(0, (K, B))
            return sum(nt_xent(z1, z2[k], self.args.temperature) for k in range(K))
        p = self._call(self.predictor, z, detached)
        if ssl == "byol":
            with torch.no_grad():
                t = self.teacher(batch)
            p1, p2 = p[:B], p[B:].unflatten(0, (K, B))
            t1, t2 = t[:B], t[B:].unflatten(0, (K, B))
            return sum(byol_loss(p1, t2[k]) + byol_loss(p2[k], t1) for k in range(K))
        z1, z2 = z[:B], z[B:2 * B]
        p1, p2 = p[:B], p[B:2 * B]
        z1m, z2m = z[2 * B:].unflatten(0, (2, K, B)).unbind(0)
        p1m, p2m = p[2 * B:].unflatten(0, (2, K, B)).unbind(0)
        total = 0
        for k in range(K):  # the official 8 terms, averaged per slot, summed over slots
            terms = [simsiam_loss(p1m[k], z2), simsiam_loss(p2m[k], z1),      # masked p, clean z
                     simsiam_loss(p2, z1m[k]), simsiam_loss(p1, z2m[k]),      # clean p, masked z
                     simsiam_loss(p1, z2), simsiam_loss(p2, z1),              # no mask
                     simsiam_loss(p1m[k], z2m[k]), simsiam_loss(p2m[k], z1m[k])]  # both masked
            total = total + torch.stack(terms).mean()
        return total

    @staticmethod
    def _call(module: nn.Module, x: torch.Tensor, detached: bool) -> torch.Tensor:
        if not detached:
            return module(x)
        params = {n: p.detach() for n, p in module.named_parameters()}
        return functional_call(module, params, (x,))

    # ------------------------------------------------------------------ method interface
    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """imgs [B, 3, S, S] normalized; keys [B] int64 per-sample draw keys (None: this rank's counter)."""
        S = self.img_size
        if imgs.dim() != 4 or imgs.shape[1:] != (3, S, S) or not imgs.is_floating_point():
            raise ValueError(f"adios: imgs must be float [B, 3, {S}, {S}], got {imgs.dtype} {tuple(imgs.shape)}")
        if imgs.shape[0] < 2:
            raise ValueError("adios: the contrastive/BatchNorm objectives need a batch of at least 2 images")
        d = self._stream.draws(imgs.shape[0], imgs.device, keys)
        x1, x2 = self.augment.two_views(imgs, draws=d.child("views"))
        occ_in = torch.cat([x1, x2]) if self.args.ssl == "simsiam" else x2
        g = d.child("slots").repeat(2) if self.args.ssl == "simsiam" else d.child("slots")
        masks = self.masker.pixel_masks(occ_in)                    # [Bx, N, H, W]
        penalty, areas = self.masker.penalty(masks)
        if self.args.mode == "simultaneous":
            ssl = self._ssl(x1, x2, grad_reverse(self._select(masks, g)), detached=False)
            loss = ssl + penalty
        else:
            ssl = self._ssl(x1, x2, self._select(masks, g).detach(), detached=False)          # phase 1: encoder
            ssl_occ = self._ssl(x1, x2, grad_reverse(self._select(masks, g)), detached=True)  # phase 2: occluder
            loss = ssl + penalty + (ssl_occ - ssl_occ.detach())
        areas = areas.detach()
        return {"loss": loss, "ssl_loss": ssl.detach(), "penalty": penalty.detach(),
                "mask_area_min": areas.min(dim=1).values.mean(), "mask_area_max": areas.max(dim=1).values.mean()}

    def on_step_end(self, step: int, total_steps: int) -> None:
        if self.teacher is not None:
            ema_update_(self.teacher, self.online, cosine_momentum(step, total_steps, self.args.momentum_base, 1.0))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Encoder + heads: decay / no-decay groups (1-D and bias and the backbone's no_weight_decay
        names skip decay). Occluder: the same split, each group with `lr_scale = mask_lr / lr`."""
        skip = {f"online.backbone.{n}" for n in getattr(self.online.backbone, "no_weight_decay", set)()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            occ = name.startswith("masker.")
            decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
            groups.setdefault((occ, decay), []).append(p)
        out = []
        for (occ, decay), params in sorted(groups.items()):
            g = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if occ:
                g["lr_scale"] = self.lr_scale
                g["name"] = "occluder"
            out.append(g)
        return out

    def encoder(self) -> nn.Module:
        return self.online.backbone

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """imgs [B, 3, S, S] normalized -> panels for `fastmask visualize`: "original" [B, 3, S, S],
        then per slot k "mask k" [B, S, S] in [0, 1] (1 = hidden) and "hide k" [B, 3, S, S] (the
        image with slot k hidden, what the encoder sees)."""
        masks = self.masker.pixel_masks(imgs).float()             # [B, N, S, S]
        hidden = masked_copies(imgs, masks.transpose(0, 1).to(imgs.dtype)).unflatten(0, (masks.shape[1], imgs.shape[0]))
        panels = {"original": imgs}
        for k in range(masks.shape[1]):
            panels[f"mask {k}"] = masks[:, k]
            panels[f"hide {k}"] = hidden[k]
        return panels
