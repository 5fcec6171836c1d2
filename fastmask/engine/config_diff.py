"""What may change when a run resumes: the new config against the resumed checkpoint's, key by key.

RULES decides per key, explicitly (a test requires a row for every config field):
- FIXED: refused. The checkpoint's weights or optimizer state would not fit the new run (model,
  image size, precision, optimizer), or it would quietly become another experiment (method).
- CHANGED: accepted, printed and recorded in metrics.jsonl as an event line, so a run that mixes two
  settings says where (batch size, mask ratio, lr and schedule, augmentation, data, ...).
- IGNORED: run control that is not part of the experiment (logging, checkpoint cadence, where to
  stop, execution options that leave the math unchanged).
`method_args.*` differ per method: a change is accepted (CHANGED) when the method's parameters keep
their names and shapes (recorded as `params` in every checkpoint), refused otherwise (decoder depth
or width, head sizes, a teacher added...): the weights decide, not a list that drifts from the methods.
"""
from __future__ import annotations

import dataclasses

import torch

from .schedule import lr_at

FIXED, CHANGED, IGNORED = "fixed", "changed", "ignored"

RULES: dict[str, str] = {
    "method": FIXED, "model": FIXED, "masking": CHANGED, "mask_ratio": CHANGED, "out": IGNORED,
    "data.loader": CHANGED, "data.root": CHANGED, "data.dataset": CHANGED, "data.img_size": FIXED,
    "data.batch_size": CHANGED,
    "data.num_workers": IGNORED, "data.min_scale": CHANGED, "data.hflip": CHANGED, "data.on_corrupt": IGNORED,
    "data.dali_threads": IGNORED, "data.synthetic_size": CHANGED,
    # zero_stage: within stages 1-2 and within stage 3 DeepSpeed's universal format converts; the trainer
    # refuses the rest (`_needs_universal`). Offload moves states between memories, the math stays.
    "engine.zero_stage": CHANGED, "engine.zero_bucket_size": IGNORED,
    "engine.zero3_max_live_parameters": IGNORED,
    "engine.offload_optimizer": IGNORED, "engine.offload_params": IGNORED,
    "engine.offload_nvme_path": IGNORED,
    "engine.precision": IGNORED,  # compared as resolved (fp32/bf16/fp16: `auto` differs per device), FIXED
    "engine.optimizer": FIXED,
    "engine.steps": CHANGED, "engine.epochs": CHANGED, "engine.stop_at": IGNORED,
    "engine.grad_accum": CHANGED,
    "engine.clip_grad": CHANGED, "engine.blr": CHANGED, "engine.lr": CHANGED, "engine.min_lr": CHANGED,
    "engine.warmup_steps": CHANGED, "engine.warmup_epochs": CHANGED, "engine.weight_decay": CHANGED,
    "engine.weight_decay_end": CHANGED,
    "engine.betas": CHANGED, "engine.momentum": CHANGED, "engine.lars_eta": CHANGED,
    "engine.lars_clip": CHANGED, "engine.seed": CHANGED,
    "engine.log_every": IGNORED, "engine.checkpoint_every": IGNORED, "engine.keep_last": IGNORED,
    "engine.compile": IGNORED, "engine.activation_checkpointing": IGNORED, "engine.cuda_graphs": IGNORED,
    "engine.on_nonfinite": IGNORED, "engine.backend": IGNORED, "engine.resume": IGNORED,
    "engine.resume_from": IGNORED, "engine.init_from": IGNORED, "engine.fp16_initial_scale_power": IGNORED,
}


@dataclasses.dataclass
class ConfigDiff:
    refused: list[str]                    # "key old -> new" of changes that cannot resume
    changed: dict[str, list]              # key -> [old, new] of accepted changes

    def describe_changes(self) -> str:
        return ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in self.changed.items())


def _show(v) -> str:
    return "null" if v is None else str(list(v) if isinstance(v, tuple) else v)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and (prefix or k in ("data", "engine", "method_args")):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def param_signature(module: torch.nn.Module) -> dict[str, list[int]]:
    """{parameter name: shape} (the full shape also for ZeRO-3 partitioned parameters)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}


def _signature_problem(saved: dict, new: dict) -> str | None:
    missing = [k for k in saved if k not in new]
    added = [k for k in new if k not in saved]
    reshaped = [f"{k} {saved[k]} -> {new[k]}" for k in saved if k in new and saved[k] != new[k]]
    groups = (("not in the new model", missing), ("new", added), ("reshaped", reshaped))
    parts = [f"{what}: {', '.join(names[:3])}{f' (+{len(names) - 3} more)' if len(names) > 3 else ''}"
             for what, names in groups if names]
    return "the method's parameters differ (" + "; ".join(parts) + ")" if parts else None


def compare(saved_cfg: dict, new_cfg: dict, saved_params: dict | None, new_params: dict,
            saved_precision: str, new_precision: str, arg_defaults: dict | None = None) -> ConfigDiff:
    """The resumed checkpoint's config, parameter signature (None in checkpoints older than the
    signature) and resolved precision against this run's. arg_defaults: the method's `Args` defaults,
    which fill the method_args either config leaves out."""
    defaults = arg_defaults or {}
    old = flatten({**saved_cfg, "method_args": {**defaults, **saved_cfg.get("method_args", {})}})
    new = flatten({**new_cfg, "method_args": {**defaults, **new_cfg.get("method_args", {})}})
    refused, changed = [], {}
    for key in sorted(set(old) & set(new)):  # a key only one side knows is a field added since: not compared
        a, b = old[key], new[key]
        if a == b:
            continue
        rule = RULES.get(key, CHANGED)
        if rule == FIXED:
            refused.append(f"{key} {_show(a)} -> {_show(b)}")
        elif rule == CHANGED:
            changed[key] = [a, b]
    if saved_precision != new_precision:
        refused.append(f"precision {saved_precision} -> {new_precision} (engine.precision="
                       f"{old.get('engine.precision')} -> {new.get('engine.precision')}; auto is bf16 on a "
                       f"GPU, fp32 on a CPU)")
    problem = _signature_problem(saved_params, new_params) if saved_params is not None else None
    if problem:
        refused.append(problem)
    return ConfigDiff(refused, changed)


def schedule_note(saved_state: dict, start_step: int, schedule: dict) -> str | None:
    """A line saying how the lr schedule changes at the resume point, when it does.
    schedule: {total, base_lr, warmup, min_lr} of this run (the checkpoint records its own)."""
    old = saved_state.get("schedule")
    if old is None:
        return None
    before = lr_at(start_step, old["total"], old["base_lr"], old["warmup"], old["min_lr"])
    after = lr_at(start_step, schedule["total"], schedule["base_lr"], schedule["warmup"], schedule["min_lr"])
    if old == schedule:
        return None
    how = f"the run had finished its {old['total']}-step schedule; " if start_step >= old["total"] else ""
    if old["total"] != schedule["total"]:
        how += (f"warmup + cosine is re-stretched over {schedule['total']} steps (as if planned that long "
                f"from step 0), so ")
    return (f"lr schedule changed: {how}step {start_step + 1} trains at lr {after:.3g} (the saved schedule "
            f"gives {before:.3g})")
