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
  level) or a fastmask run/checkpoint folder. A state of the whole method (the official
  `mae_pretrain_vit_base_full.pth`, a fastmask run) loads with strict key matching (a missing or an
  unexpected key is an error naming them). An encoder-only state (the released
  `mae_pretrain_vit_base.pth`: cls_token, pos_embed, patch_embed, blocks, norm; or a file written
  by `export_encoder`) loads strictly into every ViT encoder of the method (student and teacher
  copies alike); the rest (MAE's decoder, heads) keeps its fresh initialization, and a line says
  which tensors those are. At ZeRO-3 every rank reads the file memory-mapped and the partitioned
  parameters are written one at a time, gathered (rank 0's values kept), so no rank ever holds
  the whole model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastmask.methods.partition import full_shape, is_partitioned

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
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in state.items()}


def encoder_state_dict(method) -> dict[str, torch.Tensor]:
    """method (a Method) -> the encoder's state dict under timm VisionTransformer names, fp32, CPU."""
    enc = method.encoder()
    return {k: v.detach().float().cpu().clone() for k, v in enc.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _method_from_checkpoint(folder: Path):
    from fastmask.methods import build_method

    from .config import Config, from_dict, validate, yaml_load
    cfg_file = folder / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no config.yaml")
    cfg = from_dict(Config, yaml_load(cfg_file.read_text()))
    validate(cfg)
    cfg.engine.init_from = None
    return build_method(cfg)


def export_encoder(ckpt_dir: str | Path, out_path: str | Path) -> Path:
    """Run or checkpoint folder -> `out_path`: the encoder as a plain fp32 state dict timm loads.

    The method is rebuilt from the checkpoint's config.yaml, loaded (strictly) with the
    consolidated fp32 weights, and its `encoder()`'s state dict is saved with torch.save, through
    a temporary file beside `out_path` that is renamed into place (or removed on failure).
    """
    from fastmask.paths import check_output_file

    out = check_output_file(out_path, "export path")
    folder = resolve_checkpoint(ckpt_dir)
    method = _method_from_checkpoint(folder)
    load_state_strict(method, consolidated_state_dict(folder), str(folder))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        torch.save(encoder_state_dict(method), tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
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
        try:
            obj = _load_mapped(p, weights_only=False)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for a file that is not its own
            raise ValueError(f"{p} is not a PyTorch weights file (torch.load: "
                             f"{type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor)
                                                       or k.endswith("_extra_state") for k, v in obj.items()):
        raise ValueError(f"{p} holds no state dict (looked at the top level and under "
                         f"{', '.join(_STATE_KEYS)})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _fit_problems(module: torch.nn.Module, state: dict) -> tuple[list[str], list[str], list[str]]:
    """-> (missing, unexpected, shape mismatches) of `state` against `module`'s state dict. Fixed,
    never-trained tensors (the frozen sin-cos position embeddings) and the method's own bookkeeping
    (`_extra_state`) may be absent; everything else (frozen teachers included) must match by name
    and shape."""
    own = module.state_dict(keep_vars=True)
    params = dict(module.named_parameters())
    optional = {k for k in own if k.endswith("_extra_state")}
    optional |= {n for n, p in params.items() if not p.requires_grad and n.endswith("pos_embed")}
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    shape = {k: full_shape(params[k]) if k in params else tuple(v.shape) for k, v in own.items()
             if isinstance(v, torch.Tensor)}  # a ZeRO-3 parameter's own shape is its placeholder's
    shapes = [f"{k}: {tuple(state[k].shape)} vs {shape[k]}" for k in state
              if k in shape and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != shape[k]]
    return missing, unexpected, shapes


@torch.no_grad()
def _load_into(module: torch.nn.Module, state: dict) -> None:
    """`module.load_state_dict(state, strict=False)`, ZeRO-3 partitioned parameters written one at
    a time while gathered (rank 0's values are kept)."""
    zero = {n: p for n, p in module.named_parameters() if is_partitioned(p) and n in state}
    for name, p in zero.items():
        with gathered([p]):
            p.data.copy_(state[name])
    module.load_state_dict({k: v for k, v in state.items() if k not in zero}, strict=False)


def _listed(names: list[str], n: int = 8) -> str:
    return f"{names[:n]}{'...' if len(names) > n else ''}"


def load_state_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """Load `state` into `module`; a missing, unexpected or misshapen tensor is one ValueError naming them."""
    missing, unexpected, shapes = _fit_problems(module, state)
    if missing or unexpected or shapes:
        model = f" (model={module.model_name})" if hasattr(module, "model_name") else ""
        raise ValueError(f"weights {source} do not fit {type(module).__name__}{model}: missing "
                         f"{_listed(missing)}; unexpected {_listed(unexpected)}; shape mismatches "
                         f"{shapes[:4]}")
    _load_into(module, state)


def vit_encoders(method: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{prefix: encoder view} for every ViT encoder in `method` (MAE itself; a student's and a
    teacher's backbone): plain VisionTransformers sharing the method's tensors."""
    from fastmask.models.vit import VisionTransformer

    return {name: m.encoder_view() for name, m in method.named_modules() if isinstance(m, VisionTransformer)}


def _group(keys: list[str]) -> str:
    """Parameter names -> their modules, counted: "decoder_blocks (32), mask_token (1)"."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")  # the module path up to the first block index, without the tensor's name
        cut = next((i for i, x in enumerate(parts) if x.isdigit()), len(parts) - 1)
        head = ".".join(parts[:max(cut, 1)])
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{h} ({n})" for h, n in counts.items())


def load_pretrained(method, path: str | Path, log=print) -> list[str]:
    """`engine.init_from`: load a weights file or a fastmask run/checkpoint folder into `method`
    (see the module docstring). -> the state-dict keys left at their fresh initialization ([] when
    the whole method was loaded); `log` gets one line naming them."""
    p = Path(path)
    state = consolidated_state_dict(p) if p.is_dir() else read_weights(p)
    if not any(_fit_problems(method, state)):
        _load_into(method, state)
        return []
    encoders = vit_encoders(method)
    enc_keys = set(next(iter(encoders.values())).state_dict()) if encoders else set()
    if not encoders or not set(state) <= enc_keys:
        load_state_strict(method, state, str(p))  # raises, naming what does not fit
    for prefix, encoder in encoders.items():
        load_state_strict(encoder, state, f"{p} (encoder-only weights, into {prefix or 'the encoder'})")
    covered = {f"{prefix}.{k}" if prefix else k for prefix in encoders for k in enc_keys}
    fresh = [k for k in method.state_dict() if k not in covered and not k.endswith("_extra_state")]
    if fresh and int(os.environ.get("RANK", "0")) == 0:
        into = ", ".join(n or "the encoder" for n in encoders)
        log(f"init_from {p}: encoder-only weights loaded into {into}; initialized fresh: {_group(fresh)}")
    return fresh
