"""Weights in and out of a run: export the encoder for timm, start from official MAE weights.

    export_encoder("runs/mae_b", "mae_b_encoder.pth")     # run folder or checkpoint folder -> timm state dict
    timm.create_model("vit_base_patch16_224", num_classes=0, global_pool="token").load_state_dict(
        torch.load("mae_b_encoder.pth"))

    fastmask pretrain --config mae_vit_base_patch16 engine.init_from=mae_pretrain_vit_base.pth

- `consolidated_state_dict(checkpoint_folder)`: the full fp32 state dict of the method from a
  DeepSpeed checkpoint of any ZeRO stage (stages 1-3: the fp32 master weights, gathered from the
  optimizer partitions with DeepSpeed's zero_to_fp32; stage 0: the module states, cast to fp32).
- `encoder_state_dict(method)`: the encoder's parameters under timm's VisionTransformer names
  (the method's `encoder()` view; fixed sin-cos pos_embed included, as timm stores it).
- `load_pretrained(method, path)`: `engine.init_from`. A weights file (an official MAE checkpoint
  `{"model": state_dict}`, or any state dict under `model`/`module`/`state_dict` or at the top
  level) or a fastmask run/checkpoint folder; loaded with strict key matching (a missing or an
  unexpected key is an error naming them).
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastmask.methods.partition import full_shape

from .checkpoint import checkpoint_root, latest_tag
from .zero import gathered

_STATE_KEYS = ("model", "module", "state_dict", "encoder")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (-> its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        tag = latest_tag(p)
        if tag is None:
            raise FileNotFoundError(f"run folder {p} holds no complete checkpoint")
        return checkpoint_root(p) / tag
    if p.is_dir() and any(p.glob("*model_states.pt")):
        return p
    raise FileNotFoundError(f"{p} is neither a run folder (with checkpoints/) nor a checkpoint folder "
                            f"(with DeepSpeed's *model_states.pt)")


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Run or checkpoint folder -> {name: fp32 tensor} of the whole method (CPU)."""
    folder = resolve_checkpoint(path)
    has_optim_partitions = any(folder.glob("*optim_states.pt"))
    zero3 = any(folder.glob("zero_pp_rank_*_model_states.pt"))
    if zero3 or has_optim_partitions:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        # zero_to_fp32 returns trainable parameters and buffers; frozen tensors (fixed sin-cos
        # position embeddings) come from the module states where DeepSpeed kept them.
        module_file = next(iter(sorted(folder.glob("*model_states.pt"))))
        module = torch.load(module_file, map_location="cpu", weights_only=False).get("module") or {}
        for k, v in module.items():
            if k not in state and isinstance(v, torch.Tensor) and v.numel() > 0:
                state[k] = v
    else:
        blob = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = blob["module"]
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in state.items()}


def encoder_state_dict(method) -> dict[str, torch.Tensor]:
    """method (a Method) -> the encoder's state dict under timm VisionTransformer names, fp32, CPU."""
    enc = method.encoder()
    return {k: v.detach().float().cpu().clone() for k, v in enc.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _method_from_checkpoint(folder: Path):
    from fastmask.methods import build_method

    from .config import from_dict, Config, validate
    import yaml
    cfg_file = folder / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no config.yaml")
    cfg = from_dict(Config, yaml.safe_load(cfg_file.read_text()))
    validate(cfg)
    cfg.engine.init_from = None
    return build_method(cfg)


def export_encoder(ckpt_dir: str | Path, out_path: str | Path) -> Path:
    """Run or checkpoint folder -> `out_path`: the encoder as a plain fp32 state dict timm loads.

    The method is rebuilt from the checkpoint's config.yaml, loaded (strictly) with the
    consolidated fp32 weights, and its `encoder()`'s state dict is saved with torch.save.
    """
    folder = resolve_checkpoint(ckpt_dir)
    method = _method_from_checkpoint(folder)
    _load_strict(method, consolidated_state_dict(folder), str(folder))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(encoder_state_dict(method), tmp)
    tmp.replace(out)
    return out


def _load_mapped(p: Path, weights_only: bool):
    """torch.load with the file memory-mapped (tensors are read when touched: every ZeRO-3 rank can
    open a large checkpoint), or plainly for files in torch's legacy (pre-zip) format."""
    try:
        return torch.load(p, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err):
            raise
        return torch.load(p, map_location="cpu", weights_only=weights_only)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file -> its state dict (official MAE: under "model"; DeepSpeed: "module")."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist")
    try:
        obj = _load_mapped(p, weights_only=True)
    except Exception:  # noqa: BLE001 - DeepSpeed/argparse objects beside the tensors (a trusted local file)
        obj = _load_mapped(p, weights_only=False)
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) or k.endswith("_extra_state")
                                                       for k, v in obj.items()):
        raise ValueError(f"{p} holds no state dict (looked at the top level and under {', '.join(_STATE_KEYS)})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _load_strict(method, state: dict, source: str) -> None:
    """Load `state` into `method` strictly; ZeRO-3 partitioned parameters one at a time, gathered
    (rank 0's copy is kept), so no rank holds the whole model at once."""
    own = method.state_dict(keep_vars=True)
    params = dict(method.named_parameters())
    # Fixed, never-trained tensors (sin-cos position embeddings) and the method's own bookkeeping
    # (`_extra_state`) may be absent; everything else must match by name and shape.
    optional = tuple(k for k, v in own.items() if k.endswith("_extra_state"))
    frozen = {n for n, p in params.items() if not p.requires_grad}
    missing = [k for k in own if k not in state and k not in optional and k not in frozen]
    unexpected = [k for k in state if k not in own]
    own_shape = {k: full_shape(params[k]) if k in params else tuple(v.shape) for k, v in own.items()
                 if isinstance(v, torch.Tensor)}
    shapes = [f"{k}: {tuple(state[k].shape)} vs {own_shape[k]}" for k in state
              if k in own_shape and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != own_shape[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"weights {source} do not fit {type(method).__name__} "
                         f"(model={getattr(method, 'model_name', '?')}): missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}; unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}; shape mismatches {shapes[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            if name in state:
                with gathered([p]):
                    p.data.copy_(state[name])
    method.load_state_dict({k: v for k, v in state.items() if k not in params}, strict=False)


def load_pretrained(method, path: str | Path) -> None:
    """`engine.init_from`: load a weights file or a fastmask run/checkpoint folder into `method`, strictly."""
    p = Path(path)
    state = consolidated_state_dict(p) if p.is_dir() else read_weights(p)
    _load_strict(method, state, str(p))
