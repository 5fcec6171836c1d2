"""Run configuration: dataclasses (one home per default), YAML onto them, dotted `key=value` overrides.

    cfg = load_config("mae_tiny", ["model=vit_small_patch16", "engine.zero_stage=2"])

A recipe is a YAML file in `fastmask/configs/` (or a path); it may name `base: <recipe>` to start
from another. Unknown keys are errors that name the key and the keys that exist. Method-specific
options live under `method_args` and are checked by the method's own `Args` dataclass when the
method is built.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..optim import OPTIMIZERS


class ConfigError(ValueError):
    """A config key, value or recipe that does not exist or does not fit."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading every float spelling of YAML 1.1, YAML 1.2 and Python: PyYAML
    follows YAML 1.1, which reads `1e-3` (no dot) as a string."""


_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {c: [r for r in rs if r[0] != _FLOAT]
                                   for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
      [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?   # 1.5, 2., 1.5e+2
    | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+                 # 1e-3, 1E3
    | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?          # .5, -.5e-1
    | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*      # YAML 1.1 base 60: 1:30.5
    | [-+]?\.(?:inf|Inf|INF) | \.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """YAML text -> Python data, floats read as YAML 1.1, 1.2 and Python read them (`1e-3` is 0.001)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    loader: str = "auto"            # auto | torch | dali | synthetic (auto: dali where installed, else torch)
    root: str | None = None         # image folder (class subfolders) or file list; None = the embedded
                                    # `dataset`
    dataset: str = "photos"         # embedded set read when root is None: photos | shapes
                                    # (fastmask.data.shapes)
    img_size: int = 224
    batch_size: int = 64            # per rank, per micro-step
    num_workers: int = 2
    min_scale: float = 0.2          # RandomResizedCrop scale range (min_scale, 1), MAE's recipe
    hflip: bool = True
    on_corrupt: str = "skip"        # skip (report the path, drop the file) | fail (stop before training)
    dali_threads: int = 2
    synthetic_size: int = 1_281_167  # samples per epoch of data.loader=synthetic (ImageNet-1k's train set)


@dataclass
class EngineConfig:
    zero_stage: int = 0
    zero_bucket_size: int = 50_000_000       # elements per ZeRO reduce/all-gather bucket (and ZeRO-3
                                             # prefetch)
    zero3_max_live_parameters: int = 100_000_000  # ZeRO-3: gathered parameters kept live at most (memory cap)
    offload_optimizer: str = "none"  # none | cpu | nvme: DeepSpeed's optimizer-state offload (ZeRO >= 1,
                                     # accelerator)
    offload_params: str = "none"     # none | cpu | nvme: parameter-partition offload (ZeRO-3, accelerator)
    offload_nvme_path: str | None = None  # a folder on a local NVMe drive, for either nvme offload
    precision: str = "auto"         # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    steps: int | None = None        # optimizer steps; None = epochs * steps_per_epoch
    stop_at: int | None = None      # stop (with a checkpoint) after this step without changing the schedule
    epochs: int = 1
    grad_accum: int = 1
    clip_grad: float | None = None
    optimizer: str = "adamw"        # adamw (torch, fused) | apex_fused_adam (NVIDIA apex, if importable)
                                    # | sgd (momentum) | lars (SGD + LARS, timm's Lars); see fastmask.optim
    blr: float = 1.5e-4             # lr = blr * effective_batch / 256 unless lr is set
    lr: float | None = None
    min_lr: float = 0.0
    warmup_steps: int | None = None  # None = warmup_epochs * steps_per_epoch
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine weight_decay -> this over the run (DINO: 0.04 -> 0.4)
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9           # sgd, lars
    lars_eta: float = 0.02          # lars trust coefficient (solo-learn / ADIOS: 0.02)
    lars_clip: bool = True          # lars: trust ratio / lr clipped at 1 (LARC), as ADIOS runs it
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0       # steps; 0 = only at the end
    keep_last: int = 2
    compile: bool = False
    activation_checkpointing: bool = False
    cuda_graphs: bool = False       # capture forward+backward as CUDA graphs (torch.compile
                                    # "reduce-overhead")
    on_nonfinite: str = "stop"      # stop | skip
    backend: str = "auto"           # fastmask.ops backend for every fused op
    resume: str = "auto"            # auto (resume when the run folder holds a checkpoint) | always | never
    resume_from: int | str | None = None  # resume this checkpoint: a step of the run folder, or a checkpoint
                                          # folder
    init_from: str | None = None    # weights to start from: an official MAE .pth or a fastmask checkpoint
                                    # folder
    fp16_initial_scale_power: int = 16  # fp16 dynamic loss scale starts at 2**this


@dataclass
class Config:
    method: str = "mae"             # mae | extrema | relaxmim | adios | mst
    model: str = "vit_base_patch16"
    masking: str = "random"         # random | block | attention | adversarial | multi
    mask_ratio: float = 0.75
    method_args: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    out: str | None = None


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fastmask.configs").iterdir()
                  if p.name.endswith(".yaml"))


def _read_recipe(name: str) -> dict:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    elif path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file {name} does not exist" if not path.exists()
                          else f"config {name} is not a file")
    else:
        res = resources.files("fastmask.configs") / f"{name}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown config {name!r}: not a YAML file and not a shipped recipe "
                              f"(shipped: {', '.join(list_recipes())})")
        text = res.read_text()
    try:
        data = yaml_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {name!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {name!r} must be a mapping at the top level")
    base = data.pop("base", None)
    return _deep_merge(_read_recipe(base), data) if base else data


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) \
            if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "method_args" else v
    if "method_args" in a and "method_args" in b:
        out["method_args"] = {**a["method_args"], **b["method_args"]}
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): the field's type check names it
    return key.strip().split("."), value


def _set_path(data: dict, path: list[str], value: Any) -> None:
    cur = data
    for k in path[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {k} is not a section")
    cur[path[-1]] = value


def _number(value: Any) -> int | float | None:
    """A YAML number, or a string any YAML or Python spelling of one (`1e-3`, `1E-3`, `.5`, `1_000`,
    `.inf`), -> int | float; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            parsed = yaml_load(value.strip())
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            return parsed
        try:
            return float(value)  # Python-only spellings: inf, nan, infinity
        except ValueError:
            return None
    return None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check/convert a YAML value to the dataclass field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise ConfigError(f"{key} may not be null")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message ("must be a finite number, got ...")
            return _coerce(options[0], value, key)
        for a in options:
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} does not fit {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)  # 1e3 and 1000.0 are the integer 1000
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        number = _number(value)
        if number is not None and math.isfinite(number):
            return float(number)
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and ill-typed values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v, prefix + k + ".")
        else:
            kwargs[k] = _coerce(tp, v, prefix + k)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(recipe: str | None = None, overrides: list[str] = ()) -> Config:
    """Recipe (shipped name or YAML path; None = defaults) + `key=value` overrides -> validated Config."""
    data = _read_recipe(recipe) if recipe else {}
    for item in overrides:
        path, value = parse_override(item)
        _set_path(data, path, value)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that need no model or data (names of models/methods are checked where built)."""
    problems = []
    if not 0.0 < cfg.mask_ratio < 1.0:
        problems.append(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        problems.append(f"engine.zero_stage must be 0, 1, 2 or 3, got {cfg.engine.zero_stage}")
    for key in ("offload_optimizer", "offload_params"):
        if getattr(cfg.engine, key) not in ("none", "cpu", "nvme"):
            problems.append(f"engine.{key} must be none|cpu|nvme, got {getattr(cfg.engine, key)!r}")
    if cfg.engine.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"engine.precision must be auto|fp32|bf16|fp16, got {cfg.engine.precision!r}")
    if cfg.data.loader not in ("auto", "torch", "dali", "synthetic"):
        problems.append(f"data.loader must be auto|torch|dali|synthetic, got {cfg.data.loader!r}")
    from fastmask.data.files import EMBEDDED_SETS

    if cfg.data.dataset not in EMBEDDED_SETS:
        problems.append(f"data.dataset must be {'|'.join(EMBEDDED_SETS)}, got {cfg.data.dataset!r}")
    if cfg.data.on_corrupt not in ("skip", "fail"):
        problems.append(f"data.on_corrupt must be skip|fail, got {cfg.data.on_corrupt!r}")
    if cfg.engine.optimizer not in OPTIMIZERS:
        problems.append(f"engine.optimizer must be {'|'.join(OPTIMIZERS)}, got {cfg.engine.optimizer!r}")
    if not 0.0 <= cfg.engine.momentum < 1.0 or cfg.engine.lars_eta <= 0:
        problems.append("engine.momentum must be in [0, 1) and engine.lars_eta > 0, got "
                        f"{cfg.engine.momentum}, {cfg.engine.lars_eta}")
    if cfg.engine.on_nonfinite not in ("stop", "skip"):
        problems.append(f"engine.on_nonfinite must be stop|skip, got {cfg.engine.on_nonfinite!r}")
    if cfg.engine.resume not in ("auto", "always", "never"):
        problems.append(f"engine.resume must be auto|always|never, got {cfg.engine.resume!r}")
    if cfg.engine.log_every < 1 or cfg.engine.keep_last < 1 or cfg.engine.checkpoint_every < 0:
        problems.append("engine.log_every and engine.keep_last must be >= 1, engine.checkpoint_every >= 0")
    if cfg.data.batch_size < 1 or cfg.engine.grad_accum < 1:
        problems.append("data.batch_size and engine.grad_accum must be >= 1")
    if cfg.engine.stop_at is not None and cfg.engine.stop_at < 1:
        problems.append(f"engine.stop_at must be >= 1, got {cfg.engine.stop_at}")
    wd, wd_end = cfg.engine.weight_decay, cfg.engine.weight_decay_end
    if wd < 0 or (wd_end is not None and wd_end < 0):
        problems.append(f"engine.weight_decay and weight_decay_end must be >= 0, got {wd} and {wd_end}")
    if cfg.engine.steps is not None and cfg.engine.steps < 1:
        problems.append(f"engine.steps must be >= 1, got {cfg.engine.steps}")
    if problems:
        raise ConfigError("; ".join(problems))
