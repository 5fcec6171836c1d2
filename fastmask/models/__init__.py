"""Models: the ViT encoder family, MAE's decoder and the official MAE layout, with a registry.

    create_model("vit_base_patch16", img_size=224, backend="auto") -> VisionTransformer
    MODELS: name -> constructor; @register_model adds one; list_models() lists them.

Registered ViTs: vit_{tiny,small,base,large,huge}_patch{16,14} (MAE's sizes; tiny/small from DeiT);
resnet18 (ADIOS's CNN path).
Parameter names follow timm and facebookresearch/mae, so their state dicts load unchanged.

Initialization rule: a module initialises its own parameters in its `__init__`; a parent that
re-initialises its children's weights does it through `child.apply(fn)`, never by reaching into
them directly. Under partitioned construction (DeepSpeed's `zero.Init`, ZeRO-3) every module is
partitioned when its own `__init__` ends, and `zero.Init` gathers each module's parameters around
an applied `fn`, one module at a time: so the same code gives the same weights at every ZeRO stage.
"""
from ._registry import MODELS, check_model_name, create_model, list_models, register_model
from .blocks import Block, DropPath, LayerScale, Mlp, PatchConv, PatchEmbed
from .mae import MaskedAutoencoderViT
from .mae_decoder import MAEDecoder, MAEDecoderLayers
from .pos_embed import sincos_2d
from . import resnet, unet  # noqa: F401  (register resnet18 and the ADIOS occluder with the registry)
from .vit import VIT_ARCHS, VisionTransformer, vit_config

__all__ = ["MODELS", "register_model", "create_model", "list_models", "check_model_name", "VisionTransformer",
           "vit_config", "VIT_ARCHS", "MAEDecoder", "MAEDecoderLayers", "MaskedAutoencoderViT", "Block",
           "Mlp", "PatchEmbed", "PatchConv", "DropPath", "LayerScale", "sincos_2d"]
