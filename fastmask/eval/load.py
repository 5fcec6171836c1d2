"""Find and load what `fastmask eval` and `fastmask visualize` need from a checkpoint.

    method, cfg = load_method("runs/mae_b")          # a run folder, a checkpoint folder or a weights file
    encoder, cfg = load_encoder("runs/mae_b")         # VisionTransformer with forward_features
    encoder, cfg = load_encoder(None, cfg=cfg)        # random init (the baseline of an evaluation)
    device = pick_device("auto")                      # --device, checked: cpu | cuda | cuda:N

What is accepted, in the order it is tried:
- a run folder `DIR` (holding `checkpoints/`) or a checkpoint folder (`DIR/checkpoints/step_N/`):
  read with `fastmask.engine.export.consolidated_state_dict` (fp32, any ZeRO stage);
- a weights file (`.pt`, `.pth`, `.bin`): a state dict, or a dict holding one under `module`,
  `model`, `state_dict` or `encoder` (official MAE checkpoints use `model`). Either the whole
  method's state dict (encoder + decoder, official MAE key names) or an encoder-only one.
The config is the `config.yaml` found beside the weights or in a folder above them (a run saves
its resolved config there); `cfg` given explicitly wins. Encoder-only state dicts (an exported
encoder, or the released official MAE encoder `mae_pretrain_vit_base.pth` with `--config
mae_vit_base_patch16`) build `fastmask.models.create_model(cfg.model, img_size=cfg.data.img_size)`.
A random init is seeded with `cfg.engine.seed`: the weights a run of `cfg` starts from.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint path that holds nothing loadable, or weights that do not fit the config."""


def resolve_weights(path: str | Path) -> Path:
    """A run folder, checkpoint folder or weights file -> the weights file, or the checkpoint
    folder (read through `fastmask.engine.export`, which consolidates every ZeRO stage)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file():
        return p
    if (p / "checkpoints").is_dir() or any(p.glob("*model_states.pt")):
        return p
    files = sorted(f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    raise CheckpointError(f"{p} holds no checkpoint: expected checkpoints/ (a run folder), DeepSpeed's "
                          "*model_states.pt (a checkpoint folder) or one weights file "
                          f"({', '.join(_WEIGHT_SUFFIXES)}); found "
                          f"{sorted(f.name for f in p.iterdir())[:10]}")


def pick_device(name: str) -> torch.device:
    """--device (auto | cpu | cuda | cuda:N) -> a device that exists here, else one clear ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False); "
                         f"use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def add_source_arguments(parser, checkpoint_help: str, random_help: str) -> None:
    """The arguments every eval-side command reads its model from: --checkpoint | --random-init,
    --config and --set (config overrides)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help=checkpoint_help)
    src.add_argument("--random-init", action="store_true", help=random_help)
    parser.add_argument("--config", default=None,
                        help="config recipe or YAML (default: the checkpoint's config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable")


def find_config(weights: Path) -> Path | None:
    """The config saved with the weights: the checkpoint folder's own `config.yaml` (for a run
    folder: its latest checkpoint's), else the nearest one above (at most 4 levels up)."""
    if weights.is_dir() and (weights / "checkpoints").is_dir():
        from fastmask.engine.export import resolve_checkpoint

        weights = resolve_checkpoint(weights) / "config.yaml"
    for folder in [weights.parent, *list(weights.parents)[1:4]]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """A run/checkpoint folder (consolidated from any ZeRO stage) or a weights file -> its state dict."""
    from fastmask.engine.export import consolidated_state_dict, read_weights

    if weights.is_dir():
        return consolidated_state_dict(weights)
    try:
        return read_weights(weights)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_config_for(weights: Path | None, cfg=None, overrides: list[str] = ()):
    from fastmask.engine.config import load_config

    if cfg is not None:
        return cfg
    found = find_config(weights) if weights is not None else None
    if found is None and weights is not None:
        raise CheckpointError(f"no config.yaml beside {weights} or in the folders above it: pass --config "
                              f"(a recipe or YAML) and --set model=... to say what the weights are")
    return load_config(str(found) if found else None, list(overrides))


def resolve_config(checkpoint: str | Path | None, recipe: str | None = None, overrides: list[str] = ()):
    """The config for a command line: `recipe` when given, else the checkpoint's config.yaml, else
    the defaults (random init); `overrides` (key=value) apply on top in every case."""
    from fastmask.engine.config import load_config

    if recipe is None and checkpoint is not None:
        found = find_config(resolve_weights(checkpoint))
        if found is None:
            raise CheckpointError(f"no config.yaml beside {checkpoint} or in the folders above it: pass "
                                  "--config (a recipe or YAML) and --set model=... to say what the weights "
                                  "are")
        recipe = str(found)
    return load_config(recipe, list(overrides))


def _is_encoder_only(state: dict, cfg) -> bool:
    """True when every key of `state` belongs to the bare encoder `cfg.model` (an exported encoder);
    a method's checkpoint has more (decoders, heads, teachers, occluders) whatever the method."""
    from fastmask.models import create_model

    with torch.device("meta"):  # keys only: no memory, no init work
        keys = set(create_model(cfg.model, img_size=cfg.data.img_size).state_dict())
    return set(state) <= keys


def _method_with(cfg, state: dict | None, weights: Path | None):
    from fastmask.methods import build_method

    if state is None:
        torch.manual_seed(cfg.engine.seed)  # the run's initial weights (the engine seeds the same way)
    method = build_method(cfg)
    if state is not None:
        _load(method, state, weights)
    return method


def load_method(path: str | Path | None, cfg=None, overrides: list[str] = (),
                device: str | torch.device = "cpu"):
    """-> (method with the checkpoint's weights, in eval mode, cfg). path None: random init from cfg."""
    weights = resolve_weights(path) if path is not None else None
    cfg = load_config_for(weights, cfg, overrides)
    state = read_state_dict(weights) if weights is not None else None
    if state is not None and _is_encoder_only(state, cfg):
        raise CheckpointError(f"{weights} holds only encoder weights; this needs the whole method "
                              f"(decoder too)")
    return _method_with(cfg, state, weights).to(device).eval(), cfg


def load_encoder(path: str | Path | None, cfg=None, overrides: list[str] = (),
                 device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """-> (encoder with `forward_features(imgs) -> [B, 1+L, D]`, in eval mode, cfg). None: random init.
    Its weights require grad as in a student, ready to fine-tune, also where the method hands out its
    EMA teacher (ExtreMA, MST), which the method keeps frozen (`methods.momentum.unfreeze_ema_`)."""
    weights = resolve_weights(path) if path is not None else None
    cfg = load_config_for(weights, cfg, overrides)
    state = read_state_dict(weights) if weights is not None else None
    if state is not None and _is_encoder_only(state, cfg):
        from fastmask.models import create_model

        encoder = create_model(cfg.model, img_size=cfg.data.img_size)
        _load(encoder, state, weights)
        return encoder.to(device).eval(), cfg
    from fastmask.methods.momentum import unfreeze_ema_

    return unfreeze_ema_(_method_with(cfg, state, weights).to(device).eval().encoder().eval()), cfg


def _load(module: nn.Module, state: dict, weights: Path) -> None:
    from fastmask.engine.export import load_state_strict

    try:
        load_state_strict(module, state, f"{weights} (with the config's model)")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
