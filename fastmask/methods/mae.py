"""MAE (He et al., arXiv 2111.06377): hide most patches, encode only the visible ones, reconstruct
the hidden ones' normalized pixels with a light decoder. See docs/methods.md, "MAE".

Layout choice: the method *is* the official model. `MAE` subclasses
`fastmask.models.MaskedAutoencoderViT`, whose attributes are facebookresearch/mae's
(patch_embed, cls_token, pos_embed, blocks, norm, decoder_embed, mask_token, decoder_pos_embed,
decoder_blocks, decoder_norm, decoder_pred) at the top level, so parameter names and state-dict
keys are the official ones with no prefix: an official checkpoint loads with
`load_state_dict(strict=True)`, and a DeepSpeed checkpoint of this method is an official-format
checkpoint plus one key, `_extra_state` (the mask generator's position, below). `encoder()` returns
a plain VisionTransformer sharing the encoder's tensors (timm-loadable state dict).

Masks come from a generator in `fastmask.masking` (random by default) drawing per-sample keyed
`fastmask.draws.Draws`: the engine passes each sample's global key (`keys=`), so a sample's mask
depends only on (engine.seed, its key), the same on any number of ranks, with any per-rank batch,
and after a resume at another world size. Called without keys (tests, benchmarks), draw n on rank r
uses keys from mix(seed, r, n), and (seed, n) is saved through get/set_extra_state. To reproduce
another implementation's masks, pass `noise=[B, L]` (as Hugging Face's ViTMAE: argsort, keep the
smallest) or ready `masks=`.
"""
from __future__ import annotations

import dataclasses

import torch

from ..masking import Masks, build_masker
from ..masking.adversarial import AdversarialMasking
from ..masking.attention_guided import AttentionGuidedMasking
from ..masking.random import RandomMasking
from ..models.attention_probe import forward_with_cls_attention
from ..models.mae import MaskedAutoencoderViT
from ..models.vit import vit_config
from ..objectives.reconstruction import PixelReconstruction
from . import register_method
from ._stream import DrawStream, _mix, _rank  # noqa: F401  (_mix/_rank: re-exported for tests)
from .base import Method


@register_method("mae")
class MAE(MaskedAutoencoderViT, Method):
    """forward(imgs [B, C, H, W] normalized) -> {"loss": fp32 scalar, "mask_ratio": fp32 scalar}.

    Args: model (a registered ViT name), img_size, mask_ratio in (0, 1), masking (a registered mask
    generator), norm_pix, decoder_embed_dim / decoder_depth / decoder_num_heads (512 / 8 / 16 as MAE
    for every size), drop_path_rate (0 in MAE pretraining), decay_tokens, backend (the fastmask.ops
    backend of every fused op), seed (of the mask generator; the rank is added per process).

    decay_tokens: the official recipe decays cls_token and mask_token (timm's add_weight_decay with
    no skip list); fastmask's default follows the project's rule of no decay on norms, biases and
    tokens. Set it True to reproduce the official optimizer groups exactly (the `mae_vit_*` recipes do).

    Precision: imgs may be fp32 with bf16/fp16 weights (the engine passes fp32 to this method,
    `keeps_fp32_images`): the encoder input is cast to the weights' dtype, the normalized-pixel target
    is computed from imgs as given, in fp32, as the official code under AMP.
    """

    keeps_fp32_images = True

    @dataclasses.dataclass
    class Args:
        norm_pix: bool = True
        decoder_embed_dim: int = 512
        decoder_depth: int = 8
        decoder_num_heads: int = 16
        drop_path_rate: float = 0.0
        decay_tokens: bool = False

    def __init__(self, model: str = "vit_base_patch16", img_size: int | tuple[int, int] = 224,
                 mask_ratio: float = 0.75, masking: str = "random", norm_pix: bool = True,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 drop_path_rate: float = 0.0, decay_tokens: bool = False, backend: str = "auto",
                 seed: int = 0):
        # Everything that can be wrong with the arguments fails here, before any weight is allocated.
        arch = vit_config(model)
        if masking == "multi":
            raise ValueError("mae: masking=multi gives M masked copies per image, which is ExtreMA's "
                             "objective (method=extrema); MAE takes random | block | attention | adversarial")
        extra = {"img_size": img_size} if masking == "adversarial" else {}  # the occluder's input size
        masker = build_masker(masking, mask_ratio=mask_ratio, **extra)
        if getattr(masker, "mode", "exact") != "exact":
            raise ValueError(f"mae: the visible-only encoder needs an exact mask ratio; attention masking "
                             f"mode={masker.mode!r} hides a random number of patches (use mode=exact)")
        super().__init__(decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                         decoder_num_heads=decoder_num_heads, img_size=img_size,
                         drop_path_rate=drop_path_rate, backend=backend, **arch)
        if hasattr(masker, "num_keep"):
            masker.num_keep(self.num_patches)  # e.g. a ratio so high that no patch is left: fail now
        self.model_name, self.mask_ratio, self.decay_tokens = model, float(mask_ratio), decay_tokens
        self.masker = masker
        self.objective = PixelReconstruction(self.patch_size, norm_pix=norm_pix, backend=backend)
        self._stream = DrawStream(seed)

    @classmethod
    def from_config(cls, cfg, args: "MAE.Args") -> "MAE":
        return cls(model=cfg.model, img_size=cfg.data.img_size, mask_ratio=cfg.mask_ratio,
                   masking=cfg.masking,
                   backend=cfg.engine.backend, seed=cfg.engine.seed, **dataclasses.asdict(args))

    # ------------------------------------------------------------------ masks
    @property
    def mask_seed(self) -> int:
        return self._stream.seed

    @mask_seed.setter
    def mask_seed(self, value: int) -> None:
        self._stream.seed = int(value)

    @property
    def mask_draws(self) -> int:
        return self._stream.draws_done

    @mask_draws.setter
    def mask_draws(self, value: int) -> None:
        self._stream.draws_done = int(value)

    @torch.compiler.disable  # Python-side hashing constants and counters: keep them out of compiled graphs
    def draw_masks(self, batch_size: int, device: torch.device, keys: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, **context) -> Masks:
        """Masks for one batch: ids_keep [B, K], ids_restore [B, L], mask [B, L] (1 = hidden), keyed by
        `keys` [B] (see the module docstring). noise [B, L]: MAE/HF-style noise to argsort instead
        (random masking only). `context` (e.g. imgs=) goes to generators that look at the data."""
        if noise is not None:
            if not isinstance(self.masker, RandomMasking):
                raise ValueError("mae: noise= drives random masking; this MAE uses "
                                 f"masking={self.masker.name!r} (pass masks= instead)")
            return self.masker(batch_size, self.grid_size, noise=noise.to(device))
        draws = self._stream.draws(batch_size, device, keys)
        return self.masker(batch_size, self.grid_size, draws=draws.child("mask"), **context)

    def get_extra_state(self) -> dict:
        return {"mask_seed": self.mask_seed, "mask_draws": self.mask_draws}

    def set_extra_state(self, state: dict) -> None:
        self.mask_seed, self.mask_draws = int(state["mask_seed"]), int(state["mask_draws"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # An official MAE checkpoint has no `_extra_state`: accept it under strict loading and keep
        # the current mask stream (nothing else may be missing).
        key = prefix + "_extra_state"
        had = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not had and key in missing_keys:
            missing_keys.remove(key)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without `_extra_state`: exactly the official MaskedAutoencoderViT keys."""
        return {k: v for k, v in self.state_dict().items() if not k.endswith("_extra_state")}

    # ------------------------------------------------------------------ method interface
    def no_weight_decay(self) -> set[str]:
        skip = super().no_weight_decay()
        return skip - {"cls_token", "mask_token"} if self.decay_tokens else skip

    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                masks: Masks | None = None) -> dict[str, torch.Tensor]:
        """imgs [B, C, H, W] normalized; keys [B] int64 per-sample draw keys (the engine's; None: this
        rank's counter); noise [B, L] (HF ViTMAE's convention: argsort, the smallest kept) or masks
        (a ready `Masks`) fix the masks instead of drawing them."""
        self.check_images(imgs)
        adversarial = isinstance(self.masker, AdversarialMasking)
        if masks is not None and (noise is not None or adversarial):
            raise ValueError("mae: masks= replaces the drawn masks; it takes neither noise= nor an "
                             "adversarial masker (whose occluder makes the masks)")
        # The network sees imgs in its weights' dtype (bf16 under DeepSpeed's bf16: the one cast the
        # engine would otherwise make); the normalized-pixel target reads `imgs` as given, fp32 from
        # the engine (`keeps_fp32_images`), as the official code computes it under AMP.
        x = imgs.to(self.patch_embed.proj.weight.dtype)
        if masks is None:
            context = {"imgs": x}
            if isinstance(self.masker, AttentionGuidedMasking):
                # AttMask-style: the encoder's own last-block cls attention on the full image, without
                # gradient, decides which patches hide (the lowest-attention ones first).
                with torch.no_grad():
                    _, attn = forward_with_cls_attention(self.encoder_view(), x)
                context["scores"] = attn.mean(dim=1)
            masks = self.draw_masks(imgs.shape[0], imgs.device, keys=keys, noise=noise, **context)
        # Adversarial masks: the encoder sees the softly occluded image (gradient-reversed into the
        # occluder), the target stays the original image, and the occluder's penalty joins the loss.
        if adversarial:
            x = self.masker.aux["imgs_masked"]
        latent = self.forward_encoder(x, masks.ids_keep)         # [B, 1+K, D]
        pred = self.forward_decoder(latent, masks.ids_restore)   # [B, L, p*p*C]
        loss = self.objective(pred, imgs, masks.mask)
        out = {"mask_ratio": masks.mask.mean()}
        if adversarial:
            out["occluder_penalty"] = self.masker.aux["penalty"]
            loss = loss + out["occluder_penalty"]
        return {"loss": loss, **out}

    def encoder(self):
        return self.encoder_view()

    def flops_per_image(self) -> float | None:
        """Matmul FLOPs of one training step per image (forward + backward = 3x forward), counted as
        `fastmask.bench.flops` does (docs/performance.md's convention); None for non-square images."""
        from ..bench.flops import MAEShape, mae_train_flops  # lazy: only the engine's logging needs it

        if self.img_size[0] != self.img_size[1]:
            return None
        shape = MAEShape(img_size=self.img_size[0], patch_size=self.patch_size, in_chans=self.in_chans,
                         embed_dim=self.embed_dim, depth=len(self.blocks),
                         num_heads=self.blocks[0].attn.num_heads,
                         decoder_embed_dim=self.decoder_embed_dim, decoder_depth=len(self.decoder_blocks),
                         decoder_num_heads=(self.decoder_blocks[0].attn.num_heads if len(self.decoder_blocks)
                                            else 1),
                         mask_ratio=self.mask_ratio)
        return float(mae_train_flops(shape))
