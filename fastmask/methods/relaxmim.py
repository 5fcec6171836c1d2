"""RelaxMIM / C-MAE (Kong & Zhang, "Understanding Masked Image Modeling via Learning Occlusion
Invariant Feature", arXiv 2208.04164): MIM as a siamese method, masked view vs full view, with the
similarity measure switchable by one value. See docs/methods.md, "RelaxMIM" (no official code: the
details below are fastmask's [unverified] reconstruction, all configurable).

    similarity: "infonce"  (C-MAE)  encoder on the visible tokens -> light decoder with learnable
                                    mask tokens (MAE's decoder, its last Linear mapping to width D)
                                    -> per-position features z^a; the same encoder on the full image
                                    -> z^b; both through one projection head h (MLP -> 256);
                                    InfoNCE at temperature 0.2.
                "mae"               MAE's decoder and normalized-pixel loss on the hidden patches
                                    (the reconstructive measure), everything else equal.

InfoNCE options:
- target: "stopgrad" (the full-image branch runs the current weights under no_grad), "ema" (an EMA
  copy of encoder + head, cosine 0.996 -> 1, updated in on_step_end) or "shared" (gradients through
  both branches);
- level: "token" (query = each hidden position's z^a, positive = z^b at the same position of the
  same image) or "image" (mean-pooled over positions, positive = the same image);
- negatives (token level): "batch" (every position of every image in the batch: logits are
  [B*(L-K), B*L], 0.5 GB fp32 at B = 64, L = 196) or "image" (the other positions of the same image only).

Attention-guided masking (`masking: attention`) takes its scores from the last block's cls
attention of the full-image pass: the target branch in "infonce" mode (no extra cost), the
encoder itself under no_grad in "mae" mode (one extra no-grad full forward): this is how MAE runs
with attention-guided masks in fastmask.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..masking import Masks, build_masker
from ..models import create_model
from ..models.attention_probe import forward_with_cls_attention
from ..models.heads import MLPHead
from ..models.mae_decoder import MAEDecoder
from ..objectives.infonce import info_nce
from ..objectives.reconstruction import PixelReconstruction
from . import register_method
from ._stream import DrawStream
from .base import Method
from .momentum import cosine_momentum, ema_update_, make_teacher
from .panels import hide_patches, patch_map, reconstruction_panels

_CHOICES = {"similarity": ("infonce", "mae"), "target": ("stopgrad", "ema", "shared"),
            "level": ("token", "image"), "negatives": ("batch", "image")}


@register_method("relaxmim")
class RelaxMIM(Method):
    """forward(imgs [B, C, H, W] normalized) -> {"loss", "mask_ratio", ...} (fp32 scalars)."""

    @dataclasses.dataclass
    class Args:
        similarity: str = "infonce"        # infonce (C-MAE) | mae (MAE's decoder objective)
        target: str = "stopgrad"           # stopgrad | ema | shared
        level: str = "token"               # token | image
        negatives: str = "batch"           # batch | image (token level)
        temperature: float = 0.2
        proj_hidden_dim: int = 2048
        proj_dim: int = 256
        head_norm: str = "ln"
        momentum: float = 0.996            # target=ema
        norm_pix: bool = True              # similarity=mae
        decoder_embed_dim: int = 512
        decoder_depth: int = 8
        decoder_num_heads: int = 16
        drop_path_rate: float = 0.0

    def __init__(self, model: str = "vit_base_patch16", img_size: int = 224, mask_ratio: float = 0.75,
                 masking: str = "random", similarity: str = "infonce", target: str = "stopgrad",
                 level: str = "token", negatives: str = "batch", temperature: float = 0.2,
                 proj_hidden_dim: int = 2048, proj_dim: int = 256, head_norm: str = "ln", momentum: float = 0.996,
                 norm_pix: bool = True, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, drop_path_rate: float = 0.0, backend: str = "auto", seed: int = 0):
        super().__init__()
        chosen = {"similarity": similarity, "target": target, "level": level, "negatives": negatives}
        problems = [f"{k} must be one of {v}, got {chosen[k]!r}" for k, v in _CHOICES.items() if chosen[k] not in v]
        if not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if masking == "multi":
            problems.append("masking=multi makes M masks per image; RelaxMIM pairs one masked view with the full image")
        if problems:
            raise ValueError("relaxmim: " + "; ".join(problems))
        self.masker = build_masker(masking, mask_ratio=mask_ratio)
        if getattr(self.masker, "mode", "exact") != "exact":
            raise ValueError("relaxmim: the encoder sees visible tokens only, so masks need an exact count")
        self.backbone = create_model(model, img_size=img_size, drop_path_rate=drop_path_rate, backend=backend)
        vit = self.backbone
        if hasattr(self.masker, "num_keep"):
            self.masker.num_keep(vit.num_patches)
        self.similarity, self.target, self.level, self.negatives = similarity, target, level, negatives
        self.temperature, self.base_momentum = temperature, momentum
        self.use_scores = masking == "attention"
        if similarity == "mae":
            self.decoder = MAEDecoder(vit.grid_size, vit.patch_size, vit.in_chans, vit.embed_dim, decoder_embed_dim,
                                      decoder_depth, decoder_num_heads, backend=backend)
            self.objective = PixelReconstruction(vit.patch_size, norm_pix=norm_pix, backend=backend)
        else:
            # patch_size 1 and in_chans D turn MAE's pixel head into a Dd -> D feature head, so the
            # decoder's per-position output lives where the full-image tokens live and one head h fits both.
            self.decoder = MAEDecoder(vit.grid_size, 1, vit.embed_dim, vit.embed_dim, decoder_embed_dim,
                                      decoder_depth, decoder_num_heads, backend=backend)
            self.head = MLPHead(vit.embed_dim, proj_hidden_dim, proj_dim, num_layers=2, norm=head_norm)
            if target == "ema":
                self.teacher = make_teacher(nn.ModuleDict({"backbone": self.backbone, "head": self.head})).eval()
        self.stream = DrawStream(seed)

    @classmethod
    def from_config(cls, cfg, args: "RelaxMIM.Args") -> "RelaxMIM":
        return cls(model=cfg.model, img_size=cfg.data.img_size, mask_ratio=cfg.mask_ratio, masking=cfg.masking,
                   backend=cfg.engine.backend, seed=cfg.engine.seed, **dataclasses.asdict(args))

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True) -> "RelaxMIM":
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        return ({f"backbone.{n}" for n in self.backbone.no_weight_decay()}
                | {"decoder.mask_token", "decoder.decoder_pos_embed"})

    def get_extra_state(self) -> dict:
        return {"stream": self.stream.state()}

    def set_extra_state(self, state: dict) -> None:
        self.stream.load(state["stream"])

    def encoder(self) -> nn.Module:
        return self.backbone

    # ------------------------------------------------------------------ step
    def _full_branch(self, imgs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (z^b projected: [B, L, d] token level / [B, d] image level, or None in mae mode;
        per-patch scores [B, L] (head-mean cls attention) when masking needs them, else None)."""
        if self.similarity == "mae":
            if not self.use_scores:
                return None, None
            with torch.no_grad():
                _, attn = forward_with_cls_attention(self.backbone, imgs)
            return None, attn.mean(dim=1)
        nets = self.teacher if self.target == "ema" else {"backbone": self.backbone, "head": self.head}
        with torch.set_grad_enabled(self.target == "shared" and torch.is_grad_enabled()):
            if self.use_scores:
                tokens, attn = forward_with_cls_attention(nets["backbone"], imgs)
                scores = attn.mean(dim=1)
            else:
                tokens, scores = nets["backbone"].forward_features(imgs), None
            z = tokens[:, 1:] if self.level == "token" else tokens[:, 1:].mean(dim=1)
            return nets["head"](z), scores

    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None,
                masks: Masks | None = None) -> dict[str, torch.Tensor]:
        """imgs [B, C, H, W]; keys [B] int64 per-sample draw keys (None: this rank's counter);
        masks: ready Masks [B] instead of drawing them."""
        vit = self.backbone
        vit.check_images(imgs)
        B, L = imgs.shape[0], vit.num_patches
        kb, scores = self._full_branch(imgs)
        if masks is None:
            d = self.stream.draws(B, imgs.device, keys)
            masks = self.masker(B, vit.grid_size, draws=d.child("mask"), scores=scores)
        latent = vit.forward_visible(imgs, masks.ids_keep)                   # [B, 1+K, D]
        out = self.decoder(latent, masks.ids_restore)                        # [B, L, p*p*C] or [B, L, D]
        metrics = {"mask_ratio": masks.mask.mean()}
        if self.similarity == "mae":
            return {"loss": self.objective(out, imgs, masks.mask), **metrics}
        if self.level == "image":
            loss = info_nce(self.head(out.mean(dim=1)), kb, self.temperature)
        else:
            K = masks.ids_keep.shape[1]
            hidden = torch.argsort(masks.ids_restore, dim=1)[:, K:]          # [B, L-K] hidden positions
            za = out.gather(1, hidden.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
            qa = self.head(za)                                               # [B, L-K, d]
            if self.negatives == "image":
                loss = info_nce(qa, kb, self.temperature, positives=hidden)
            else:
                pos = hidden + torch.arange(B, device=imgs.device).unsqueeze(1) * L
                loss = info_nce(qa.flatten(0, 1), kb.flatten(0, 1), self.temperature, positives=pos.flatten())
        return {"loss": loss, **metrics}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """imgs [B, 3, S, S] normalized -> panels for `fastmask visualize`: "original", "mask"
        [B, 1, S, S] (1 = hidden), "masked" (hidden patches grey: the encoder sees the visible ones),
        then what the decoder does:
        - similarity "mae": "reconstruction" and "recon + visible" (the decoder's pixels, each patch
          mapped back with the true patch's mean and variance when norm_pix);
        - similarity "infonce": "similarity" [B, 1, S, S], per position (cos + 1) / 2 of the masked
          branch's decoder output and the full-image branch's token, both through the head h."""
        vit = self.backbone
        vit.check_images(imgs)
        kb, scores = self._full_branch(imgs)
        d = self.stream.draws(imgs.shape[0], imgs.device)
        masks = self.masker(imgs.shape[0], vit.grid_size, draws=d.child("mask"), scores=scores)
        out = self.decoder(vit.forward_visible(imgs, masks.ids_keep), masks.ids_restore)
        p, grid = vit.patch_size, vit.grid_size
        panels = {"original": imgs, "mask": patch_map(masks.mask, grid, p)}
        if self.similarity == "mae":
            return {**panels, **reconstruction_panels(imgs, masks.mask, out, p, self.objective.norm_pix)}
        if self.level == "image":  # kb is pooled: project the full-image tokens position by position
            nets = self.teacher if self.target == "ema" else {"backbone": self.backbone, "head": self.head}
            kb = nets["head"](nets["backbone"].forward_features(imgs)[:, 1:])
        cos = torch.nn.functional.cosine_similarity(self.head(out).float(), kb.float(), dim=-1)   # [B, L]
        return {**panels, "masked": hide_patches(imgs, masks.mask, p),
                "similarity": patch_map((cos + 1) / 2, grid, p)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        if hasattr(self, "teacher"):
            ema_update_(self.teacher, nn.ModuleDict({"backbone": self.backbone, "head": self.head}),
                        cosine_momentum(step, total_steps, self.base_momentum))
