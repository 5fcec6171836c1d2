"""RelaxMIM (Kong & Zhang, "Understanding Masked Image Modeling via Learning Occlusion Invariant
Feature", arXiv 2208.04164): MIM as a siamese method, masked view vs full view, with the similarity
measure switchable by one value. See docs/methods.md, "RelaxMIM" (no official code: the details
below are fastmask's [unverified] reconstruction, all configurable).

    similarity: "infonce" (C-MAE)  encoder f on the visible tokens -> light decoder with learnable
                                   mask tokens (MAE's decoder, its last Linear mapping to width D)
                                   -> per-position features z^a; the same encoder on the full image
                                   -> z^b; both through one projection head h (MLP -> 256);
                                   InfoNCE at temperature 0.2.
                "rmae"   (R-MAE)   the relaxed siamese form of MAE: the decoder g is the distance.
                                   L = sum_{i hidden} |g(f(M x))_i - g(f(x))_i|^2 / #hidden
                                       + ae_weight * sum_i |t(x)_i - g(f(x))_i|^2 / L
                                   (each squared norm averaged over the patch vector, as MAE), where
                                   t(x) is MAE's target (per-patch normalized pixels when norm_pix).
                                   It is MAE's loss with t(x) replaced by the full branch's
                                   reconstruction g(f(x)), plus the auto-encoding term that makes
                                   g(f(x)) ~ t(x) true: the substitution's condition, and the only
                                   anchor to the pixels (with ae_weight = 0 both branches can agree
                                   on any constant and collapse).
                "pixel"            plain MAE: its decoder and normalized-pixel loss on the hidden
                                   patches against the image itself (no second branch).

target (infonce, rmae): how the full-image branch's gradient flows in the siamese term.
- "stopgrad" (default): the full branch's output is a constant target there. For R-MAE this follows
  the derivation: MAE's target t(x) is data, so its stand-in g(f(x)) is treated as data in the
  relaxed term; f and g still learn from the full image through the auto-encoding term.
- "ema": the target comes from an EMA copy (encoder + head, or encoder + decoder for R-MAE;
  cosine 0.996 -> 1, updated in on_step_end); R-MAE's auto-encoding term still runs the online
  networks on the full image (one more full pass).
- "shared": gradients flow through both branches.

The relaxed target g(f(x)) is used as the decoder gives it, with no second per-patch normalization:
the auto-encoding term trains it towards t(x), in the normalized-pixel space already, so the relaxed
loss is MAE's with t(x) substituted literally.

InfoNCE options:
- level: "token" (query = each hidden position's z^a, positive = z^b at the same position of the
  same image) or "image" (mean-pooled over positions, positive = the same image);
- negatives (token level): "batch" (every position of every image in the batch: logits are
  [B*(L-K), B*L], 0.5 GB fp32 at B = 64, L = 196) or "image" (the other positions of the same image only).

Cost per step against MAE: C-MAE adds one full-image encoder pass (without gradient under stopgrad
and ema); R-MAE adds a full-image encoder and decoder pass, with gradient when ae_weight > 0: 3.4x
MAE's training matmul FLOPs at ViT-B/16, 224 px (58.7 + 138.0 GFLOP per image, fastmask.bench.flops).

Attention-guided masking (`masking: attention`) takes its scores from the last block's cls
attention of the full-image pass (infonce, rmae: no extra cost), or of one extra no-grad encoder
pass (pixel: how MAE runs with attention-guided masks in fastmask).

decay_tokens: as MAE's (the official MAE recipe decays the cls and mask tokens; RelaxMIM's training
follows MAE's recipe, so `relaxmim_vit_base` inherits it from `mae_vit_base_patch16`).

Precision: imgs may be fp32 with bf16/fp16 weights (`keeps_fp32_images`): the networks see imgs cast
to the encoder's dtype, pixel targets (pixel, rmae) read the fp32 pixels, as MAE.
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
from ..objectives.reconstruction import PixelReconstruction, relaxed_reconstruction
from . import register_method
from ._stream import DrawStream
from .base import Method
from .momentum import cosine_momentum, ema_update_, make_teacher, teacher_mode_
from .panels import hide_patches, patch_map, reconstruction_panels

_CHOICES = {"similarity": ("infonce", "rmae", "pixel"), "target": ("stopgrad", "ema", "shared"),
            "level": ("token", "image"), "negatives": ("batch", "image")}


@register_method("relaxmim")
class RelaxMIM(Method):
    """forward(imgs [B, C, H, W] normalized) -> {"loss", "mask_ratio", ...} (fp32 scalars; R-MAE adds
    "relax" and "ae", its two terms)."""

    keeps_fp32_images = True

    @dataclasses.dataclass
    class Args:
        similarity: str = "infonce"        # infonce (C-MAE) | rmae (R-MAE, relaxed MAE) | pixel (plain MAE)
        target: str = "stopgrad"           # stopgrad | ema | shared (infonce, rmae)
        level: str = "token"               # token | image (infonce)
        negatives: str = "batch"           # batch | image (infonce, token level)
        temperature: float = 0.2
        proj_hidden_dim: int = 2048
        proj_dim: int = 256
        head_norm: str = "ln"
        momentum: float = 0.996            # target=ema
        norm_pix: bool = True              # pixel, rmae
        ae_weight: float = 1.0             # rmae: weight of the auto-encoding term |t(x) - g(f(x))|^2
        decay_tokens: bool = False         # weight decay on backbone.cls_token and decoder.mask_token (MAE's)
        decoder_embed_dim: int = 512
        decoder_depth: int = 8
        decoder_num_heads: int = 16
        drop_path_rate: float = 0.0

    def __init__(self, model: str = "vit_base_patch16", img_size: int = 224, mask_ratio: float = 0.75,
                 masking: str = "random", similarity: str = "infonce", target: str = "stopgrad",
                 level: str = "token", negatives: str = "batch", temperature: float = 0.2,
                 proj_hidden_dim: int = 2048, proj_dim: int = 256, head_norm: str = "ln",
                 momentum: float = 0.996,
                 norm_pix: bool = True, ae_weight: float = 1.0, decay_tokens: bool = False,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 drop_path_rate: float = 0.0, backend: str = "auto", seed: int = 0):
        super().__init__()
        chosen = {"similarity": similarity, "target": target, "level": level, "negatives": negatives}
        if similarity == "mae":
            raise ValueError("relaxmim: similarity=mae is now spelled similarity=pixel (plain MAE: its "
                             "decoder and loss against the image); similarity=rmae is the relaxed siamese "
                             "form")
        problems = [f"{k} must be one of {v}, got {chosen[k]!r}" for k, v in _CHOICES.items()
                    if chosen[k] not in v]
        if not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if not ae_weight >= 0:
            problems.append(f"ae_weight must be >= 0, got {ae_weight}")
        if masking == "multi":
            problems.append("masking=multi makes M masks per image; RelaxMIM pairs one masked view with the "
                            "full image")
        if problems:
            raise ValueError("relaxmim: " + "; ".join(problems))
        self.masker = build_masker(masking, mask_ratio=mask_ratio)
        if getattr(self.masker, "mode", "exact") != "exact":
            raise ValueError("relaxmim: the encoder sees visible tokens only, so masks need an exact count")
        # Builders of the full-image branch's networks: the EMA teacher (target=ema) is built by the
        # same ones (partitioned like the student under ZeRO-3, see momentum.make_teacher).
        def backbone() -> nn.Module:
            return create_model(model, img_size=img_size, drop_path_rate=drop_path_rate, backend=backend)

        self.backbone = backbone()
        vit = self.backbone
        if hasattr(self.masker, "num_keep"):
            self.masker.num_keep(vit.num_patches)
        self.similarity, self.target, self.level, self.negatives = similarity, target, level, negatives
        self.temperature, self.base_momentum, self.ae_weight = temperature, momentum, float(ae_weight)
        self.decay_tokens = decay_tokens
        self.use_scores = masking == "attention"
        if similarity == "infonce":
            # patch_size 1 and in_chans D turn MAE's pixel head into a Dd -> D feature head, so the
            # decoder's per-position output lives where the full-image tokens live and one head h fits both.
            self.decoder = MAEDecoder(vit.grid_size, 1, vit.embed_dim, vit.embed_dim, decoder_embed_dim,
                                      decoder_depth, decoder_num_heads, backend=backend)

            def second() -> nn.Module:  # the head h
                return MLPHead(vit.embed_dim, proj_hidden_dim, proj_dim, num_layers=2, norm=head_norm)

            self.head = second()
        else:
            def second() -> nn.Module:  # the pixel decoder
                return MAEDecoder(vit.grid_size, vit.patch_size, vit.in_chans, vit.embed_dim,
                                  decoder_embed_dim, decoder_depth, decoder_num_heads, backend=backend)

            self.decoder = second()
            self.objective = PixelReconstruction(vit.patch_size, norm_pix=norm_pix, backend=backend)
        if target == "ema" and similarity != "pixel":
            name = "head" if similarity == "infonce" else "decoder"
            teacher = make_teacher(self._online(),
                                   lambda: nn.ModuleDict({"backbone": backbone(), name: second()}))
            self.teacher = teacher_mode_(teacher, self.training)
        self.stream = DrawStream(seed)

    @classmethod
    def from_config(cls, cfg, args: "RelaxMIM.Args") -> "RelaxMIM":
        return cls(model=cfg.model, img_size=cfg.data.img_size, mask_ratio=cfg.mask_ratio,
                   masking=cfg.masking,
                   backend=cfg.engine.backend, seed=cfg.engine.seed, **dataclasses.asdict(args))

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True) -> "RelaxMIM":
        super().train(mode)
        if hasattr(self, "teacher"):
            teacher_mode_(self.teacher, mode)
        return self

    def no_weight_decay(self) -> set[str]:
        skip = {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | {"decoder.mask_token",
                                                                            "decoder.decoder_pos_embed"}
        return skip - {"backbone.cls_token", "decoder.mask_token"} if self.decay_tokens else skip

    def get_extra_state(self) -> dict:
        return {"stream": self.stream.state()}

    def set_extra_state(self, state: dict) -> None:
        self.stream.load(state["stream"])

    def encoder(self) -> nn.Module:
        return self.backbone

    def _online(self) -> nn.ModuleDict:
        """The networks of the full-image branch (what an EMA teacher copies): encoder + head (C-MAE)
        or encoder + decoder (R-MAE)."""
        second = "head" if self.similarity == "infonce" else "decoder"
        return nn.ModuleDict({"backbone": self.backbone, second: getattr(self, second)})

    # ------------------------------------------------------------------ the full-image branch
    def _encode_full(self, backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (tokens [B, 1+L, D], per-patch scores [B, L] (head-mean last-block cls attention) when
        masking needs them, else None)."""
        if not self.use_scores:
            return backbone.forward_features(x), None
        tokens, attn = forward_with_cls_attention(backbone, x)
        return tokens, attn.mean(dim=1).detach()

    def _cmae_full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (z^b projected: [B, L, d] token level / [B, d] image level, scores or None)."""
        nets = self.teacher if self.target == "ema" else self._online()
        with torch.set_grad_enabled(self.target == "shared" and torch.is_grad_enabled()):
            tokens, scores = self._encode_full(nets["backbone"], x)
            z = tokens[:, 1:] if self.level == "token" else tokens[:, 1:].mean(dim=1)
            return nets["head"](z), scores

    def _reconstruct_full(self, nets: nn.ModuleDict,
                          x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (g(f(x)) [B, L, p*p*C]: the decoder on every patch, no mask token; scores or None)."""
        tokens, scores = self._encode_full(nets["backbone"], x)
        B, L = tokens.shape[0], tokens.shape[1] - 1
        in_order = torch.arange(L, device=x.device).repeat(B, 1)   # ids_restore of "all L visible, in order"
        return nets["decoder"](tokens, in_order), scores

    def _rmae_full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (the relaxed term's target g(f(x)), the online g(f(x)) for the auto-encoding term (None when
        ae_weight = 0), scores or None)."""
        ae = self.ae_weight > 0
        if self.target == "ema":
            with torch.no_grad():
                target, scores = self._reconstruct_full(self.teacher, x)
            return target, (self._reconstruct_full(self._online(), x)[0] if ae else None), scores
        with torch.set_grad_enabled(torch.is_grad_enabled() and (ae or self.target == "shared")):
            full, scores = self._reconstruct_full(self._online(), x)
        return (full if self.target == "shared" else full.detach()), (full if ae else None), scores

    # ------------------------------------------------------------------ step
    def _masked_step(self, x: torch.Tensor, keys: torch.Tensor | None,
                     masks: Masks | None) -> tuple[object, Masks, torch.Tensor]:
        """x [B, C, H, W] in the networks' dtype -> (the full branch's result: z^b (infonce), (relaxed
        target, online g(f(x)) or None) (rmae), None (pixel); masks; the decoder's output from the
        visible patches [B, L, p*p*C] or [B, L, D]). The full branch runs first: attention-guided
        masks read its scores."""
        vit = self.backbone
        full, scores = None, None
        if self.similarity == "infonce":
            full, scores = self._cmae_full(x)
        elif self.similarity == "rmae":
            *full, scores = self._rmae_full(x)
        elif self.use_scores and masks is None:
            with torch.no_grad():
                scores = self._encode_full(vit, x)[1]
        if masks is None:
            d = self.stream.draws(x.shape[0], x.device, keys)
            masks = self.masker(x.shape[0], vit.grid_size, draws=d.child("mask"), scores=scores)
        latent = vit.forward_visible(x, masks.ids_keep)                     # [B, 1+K, D]
        return full, masks, self.decoder(latent, masks.ids_restore)

    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None,
                masks: Masks | None = None) -> dict[str, torch.Tensor]:
        """imgs [B, C, H, W]; keys [B] int64 per-sample draw keys (None: this rank's counter);
        masks: ready Masks [B] instead of drawing them."""
        vit = self.backbone
        vit.check_images(imgs)
        B, L = imgs.shape[0], vit.num_patches
        # the networks' input; targets read imgs
        x = imgs.to(vit.patch_embed.proj.weight.dtype)
        full, masks, out = self._masked_step(x, keys, masks)
        metrics = {"mask_ratio": masks.mask.mean()}
        if self.similarity == "pixel":
            return {"loss": self.objective(out, imgs, masks.mask), **metrics}
        if self.similarity == "rmae":
            relaxed_target, online_full = full
            loss = metrics["relax"] = relaxed_reconstruction(out, relaxed_target, masks.mask)
            if online_full is not None:
                metrics["ae"] = self.objective(online_full, imgs, torch.ones_like(masks.mask))
                loss = loss + self.ae_weight * metrics["ae"]
            return {"loss": loss, **{k: v.detach() for k, v in metrics.items()}}
        kb = full
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
        - similarity "pixel" or "rmae": "reconstruction" and "recon + visible" (the masked branch's
          decoded pixels, each patch mapped back with the true patch's mean and variance when norm_pix);
        - similarity "infonce": "similarity" [B, 1, S, S], per position (cos + 1) / 2 of the masked
          branch's decoder output and the full-image branch's token, both through the head h."""
        vit = self.backbone
        vit.check_images(imgs)
        x = imgs.to(vit.patch_embed.proj.weight.dtype)
        kb, masks, out = self._masked_step(x, None, None)
        p, grid = vit.patch_size, vit.grid_size
        panels = {"original": imgs, "mask": patch_map(masks.mask, grid, p)}
        if self.similarity != "infonce":
            return {**panels, **reconstruction_panels(imgs, masks.mask, out, p, self.objective.norm_pix)}
        if self.level == "image":  # kb is pooled: project the full-image tokens position by position
            nets = self.teacher if self.target == "ema" else self._online()
            kb = nets["head"](nets["backbone"].forward_features(x)[:, 1:])
        cos = torch.nn.functional.cosine_similarity(self.head(out).float(), kb.float(), dim=-1)   # [B, L]
        return {**panels, "masked": hide_patches(imgs, masks.mask, p),
                "similarity": patch_map((cos + 1) / 2, grid, p)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        if hasattr(self, "teacher"):
            ema_update_(self.teacher, self._online(), cosine_momentum(step, total_steps, self.base_momentum))
