"""The training loop: one Method, one loader, one DeepSpeed engine.

    result = pretrain(load_config("mae_tiny", ["engine.steps=40"]), out="runs/tiny")

What happens, in order (everything that can be wrong with the input fails before step 1):
1. the config is validated; rank, world size and device come from the environment (a plain process
   sets the single-process rendezvous variables itself, see `distributed`);
2. the ZeRO/offload settings are checked against the device and the method (`zero.check`); the
   method is built (unknown method/model names, image size vs patch size, mask ratio: errors
   here), seeded identically on every rank so all ranks start from the same weights, at ZeRO-3
   partitioned as it is built (`zero.construct`: no rank holds the whole model); the loader is
   built (missing/corrupt images: errors here); `engine.init_from` weights are loaded;
3. the optimizer named by engine.optimizer over the method's param groups (`fastmask.optim`: AdamW,
   fused on CUDA and CPU, by default; SGD or LARS) and a generated DeepSpeed config
   (ZeRO stage, bf16/fp16/fp32, accumulation, clipping) go to `deepspeed.initialize`;
4. the run folder (`RunFolder`, before anything is written in it): rank 0 locks it (a second run
   is refused, naming the holder), picks the checkpoint to resume by scanning (the newest
   complete good one with `engine.resume=auto`, the default; `always` requires one, `never`
   starts over and moves the old run aside; `engine.resume_from` names one) and compares this
   config with the checkpoint's (`config_diff`: refused or listed and recorded); then it moves
   aside what does not belong to the continued run and writes config.yaml and ds_config.json.
   Model, optimizer, loss scaler, step, data position and RNG states are restored, so the
   continued run takes the same steps an uninterrupted one would;
5. the loop: per optimizer step the lr is set from the step index (warmup + cosine; the decay
   groups' weight decay too, cosine to `engine.weight_decay_end` when set, DINO's schedule), each
   micro-batch runs forward (with every sample's global key, `Loader.sample_keys`, from which the
   method draws its masks and views: the same whatever the world size) /backward/step, then
   `method.post_step(lr)` (a method's own phase after the step: ADIOS's occluder) and
   `method.on_step_end(step, total)`. The loss and
   metrics are summed on the device (no host sync per step) and reduced every `log_every` steps
   into DIR/metrics.jsonl; checkpoints every `checkpoint_every` steps and at the end, each with
   its `health` verdict (`fastmask.engine.health`). SIGTERM/SIGINT end the run after the current
   step with a checkpoint (`StoppedBySignal`; the CLI exits 128 + the signal number).

Non-finite losses: with fp16, DeepSpeed's dynamic loss scaler skips the step (counted as
`skipped`); with bf16, DeepSpeed's overflow check skips steps with non-finite gradients (counted).
`engine.on_nonfinite=stop` (the default) additionally stops the run at the next log or checkpoint
boundary with the step of the first non-finite loss; no checkpoint is written after it, and the
error names the newest checkpoint judged good (a checkpoint whose own weights gave the non-finite
loss, or exploded weights, is not), which running again resumes. `skip` keeps going, counting;
fp32 has no overflow check in DeepSpeed, so `skip` needs bf16 or fp16.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from ..optim import OptimizerSettings
from ..optim import build_optimizer as _build_optimizer
from .config import Config, ConfigError, to_dict, validate
from .config_diff import param_signature
from .distributed import (RENDEZVOUS_VARS, DistInfo, all_reduce_max, all_reduce_mean, dist_info,
                          init_distributed)
from .health import CheckpointHealth
from .metrics import MetricsLogger, device_peak_tflops, peak_memory_gb
from .runfolder import RunFolder
from .schedule import scaled_lr
from .step import DTYPES, Schedule, StepSums, after_step, decaying_groups, micro_step
from .signals import StopOnSignal, StoppedBySignal
from .zero import check as check_zero, construct, offload_config, share_fp32_master


class NonFiniteLossError(RuntimeError):
    """The loss went NaN/inf (bf16/fp32, engine.on_nonfinite=stop)."""

    def __init__(self, step: int, last_checkpoint: str | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        where = (f"the newest good checkpoint is {last_checkpoint}, which running again resumes"
                 if last_checkpoint else "no good checkpoint was written")
        super().__init__(f"non-finite loss at step {step}; stopped ({where}). Lower the lr, lengthen the "
                         "warmup, enable engine.clip_grad, or set engine.on_nonfinite=skip (bf16/fp16) to "
                         "skip such steps.")


@dataclasses.dataclass
class RunResult:
    step: int                        # optimizer steps done (total, including those before a resume)
    total_steps: int                 # length of the lr schedule
    losses: list[tuple[int, float]]  # (step, mean loss of the interval ending there), this invocation
    resumed_from: int | None         # the step resumed from, or None
    skipped_steps: int
    out: Path | None
    last_checkpoint: Path | None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("engine.precision=fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling); "
                          "use fp32 or bf16 on CPU")
    return precision


def build_ds_config(cfg: Config, world_size: int, precision: str, device: torch.device,
                    load_universal: bool = False) -> dict:
    """The DeepSpeed config dict this run hands to deepspeed.initialize (also saved as DIR/ds_config.json)."""
    e = cfg.engine
    B = cfg.data.batch_size
    zero: dict = {"stage": e.zero_stage}
    if e.zero_stage >= 1:
        # Buckets of 5e7 elements (DeepSpeed's default is 5e8: 2 GB per fp32 bucket, which is most
        # of ZeRO's saving for a ViT-L on a few ranks).
        zero.update(contiguous_gradients=True, overlap_comm=device.type == "cuda",
                    reduce_bucket_size=e.zero_bucket_size, allgather_bucket_size=e.zero_bucket_size)
    if e.zero_stage == 3:
        # DeepSpeed's default keeps up to 1e9 gathered parameters live (all of a ViT-H): cap it, so
        # stage 3 actually holds about one block's full weights at a time beyond its partition.
        # Gathering the full 16-bit model for every save would cost a full copy on rank 0; we save
        # the partitions and consolidate offline (fastmask.engine.export).
        zero.update(stage3_prefetch_bucket_size=e.zero_bucket_size,
                    stage3_max_live_parameters=e.zero3_max_live_parameters,
                    stage3_max_reuse_distance=e.zero3_max_live_parameters,
                    stage3_gather_16bit_weights_on_model_save=False)
    zero.update(offload_config(e))
    ds = {
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": e.grad_accum,
        "train_batch_size": B * e.grad_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": float(e.clip_grad or 0.0),
        "steps_per_print": 2**31 - 1,  # our own logger reports; DeepSpeed's would sync per step
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # offload with torch's AdamW (CPU-fused) rather than DeepSpeedCPUAdam
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": e.fp16_initial_scale_power, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_method(cfg: Config, factory: Callable[[Config], torch.nn.Module] | None):
    if factory is not None:
        return factory(cfg)
    from fastmask.methods import build_method
    return build_method(cfg)


def _enable_activation_checkpointing(method) -> None:
    for target in (method, getattr(method, "encoder", lambda: None)()):
        if target is not None and hasattr(target, "set_grad_checkpointing"):
            target.set_grad_checkpointing(True)
            return
    raise ConfigError(f"engine.activation_checkpointing=true but method {type(method).__name__} (and its "
                      f"encoder) has no set_grad_checkpointing()")


def _crash_point(step: int) -> None:
    if os.environ.get("FASTMASK_TEST_CRASH_AT", "") == f"step:{step}":
        os._exit(137)  # a kill -9 right after optimizer step `step`, before its log or checkpoint


def build_optimizer(name: str, groups: list[dict], lr: float, e,
                    device: torch.device) -> torch.optim.Optimizer:
    """The engine's optimizer over the method's param groups: `fastmask.optim.build_optimizer` with the
    engine config's settings (betas, momentum, LARS trust coefficient and clip); errors as ConfigError."""
    try:
        return _build_optimizer(name, groups, lr, OptimizerSettings.of(e), device)
    except ValueError as err:
        raise ConfigError(f"engine.{err}") from err


def pretrain(cfg: Config, out: str | Path | None = None,
             method_factory: Callable[[Config], torch.nn.Module] | None = None,
             progress: bool | None = None) -> RunResult:
    """Run (or resume) pretraining as configured. `out` (default cfg.out) is the run folder; None
    runs without writing anything. `method_factory(cfg) -> Method` replaces the registry (tests).

    The rendezvous variables a plain process sets for itself are removed again on return, so a
    subprocess started later (a test, a launcher) does not inherit this process's MASTER_PORT.
    """
    saved_env = {k: os.environ.get(k) for k in RENDEZVOUS_VARS}
    try:
        with contextlib.ExitStack() as closing:  # the run folder's lock, the signal handlers
            return _pretrain(cfg, out, method_factory, progress, closing)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pretrain(cfg: Config, out: str | Path | None, method_factory, progress: bool | None,
              closing: contextlib.ExitStack) -> RunResult:
    validate(cfg)
    e = cfg.engine
    out = Path(out) if out is not None else (Path(cfg.out) if cfg.out else None)
    info: DistInfo = dist_info()
    device = info.device
    precision = resolve_precision(e.precision, device)
    if e.on_nonfinite == "skip" and precision == "fp32":
        raise ConfigError("engine.on_nonfinite=skip needs engine.precision bf16 or fp16 (DeepSpeed skips "
                          "steps through its overflow check, which fp32 does not run); fp32 runs stop")
    dtype = DTYPES[precision]

    # --- everything that can be wrong with the input fails here, before any training work
    check_zero(cfg, device, registry=method_factory is None)
    _seed_all(e.seed)  # the same on every rank: identical initial weights
    # ZeRO-3: partitioned as built
    method = construct(lambda: _build_method(cfg, method_factory), cfg, info,
                       build_ds_config(cfg, info.world_size, precision, device))
    from fastmask.data import build_loader
    views = method.view_specs() if hasattr(method, "view_specs") else None  # crops cut from the full image
    loader = build_loader(cfg.data, info.rank, info.world_size, seed=e.seed, device=device, views=views)
    steps_per_epoch = loader.batches_per_epoch // e.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(f"one epoch has {loader.batches_per_epoch} micro-batches per rank, fewer than "
                          f"engine.grad_accum={e.grad_accum}")
    if hasattr(method, "set_epoch_length"):
        method.set_epoch_length(steps_per_epoch)
    total = e.steps if e.steps is not None else e.epochs * steps_per_epoch
    stop = min(total, e.stop_at) if e.stop_at is not None else total
    warmup = e.warmup_steps if e.warmup_steps is not None else round(e.warmup_epochs * steps_per_epoch)
    global_batch = cfg.data.batch_size * e.grad_accum * info.world_size
    base_lr = e.lr if e.lr is not None else scaled_lr(e.blr, global_batch)
    if e.init_from:
        from .export import load_pretrained
        load_pretrained(method, e.init_from)
    if e.activation_checkpointing:
        _enable_activation_checkpointing(method)

    # --- the run folder: locked, and the run checked against the one it continues, before any write
    schedule = {"total": total, "base_lr": base_lr, "warmup": warmup, "min_lr": e.min_lr}
    signature = param_signature(method)
    if out is not None and info.world_size > 1:
        init_distributed(info)  # the ranks receive rank 0's decisions on the run folder
    run = (closing.enter_context(contextlib.closing(RunFolder.open(
        out, cfg, info, precision, signature, _arg_defaults(method), schedule))) if out is not None else None)
    saved = run.resume_state if run else None
    resume_dir = run.resume_folder if run else None
    load_universal = saved is not None and _needs_universal(saved, info.world_size, e.zero_stage, resume_dir,
                                                            e.optimizer)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    ds_config = build_ds_config(cfg, info.world_size, precision, device, load_universal)
    if run:
        run.commit(config_yaml, ds_config)
    if load_universal:
        from .universal import ensure_universal
        ensure_universal(resume_dir.parent, resume_dir.name, info, e.zero_stage)

    # --- DeepSpeed (imported only now: bad input above is reported without its start-up noise)
    import deepspeed

    init_distributed(info)
    method.to(device)
    optimizer = build_optimizer(e.optimizer, method.param_groups(e.weight_decay), base_lr, e, device)
    decaying = decaying_groups(optimizer)  # the groups the weight-decay schedule moves
    engine, _, _, _ = deepspeed.initialize(model=method, optimizer=optimizer, config=ds_config)
    share_fp32_master(engine)
    if e.compile or e.cuda_graphs:
        # CUDA graphs through torch.compile's "reduce-overhead" mode (cudagraph trees): the whole
        # forward and backward replay as graphs where shapes are static, as MAE's visible-token count is.
        engine.compile(compile_kwargs={"mode": "reduce-overhead"} if e.cuda_graphs else {})
    _seed_all(e.seed * 1_000_003 + info.rank + 1)  # the training stream: differs per rank

    start_step = 0
    if saved is not None:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        ckpt.load(engine, resume_dir, info.rank, universal=load_universal)
        # DeepSpeed's ZeRO-3 universal load (0.19) copies group 0's hyperparameters into every group
        # (the no-decay group would get weight decay) and gives every parameter the *same* `step`
        # tensor (AdamW increments it in place, once per group: wrong bias correction). Restore the
        # groups' settings and give each state its own step counter.
        for g, h in zip(optimizer.param_groups, hyper):
            g.update(h)
        for st in optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
        start_step = int(saved["step"])
    health = CheckpointHealth(saved.get("health") if saved else None, run.start.good if run else [])
    health.start(engine.module)
    stop_signal = closing.enter_context(StopOnSignal())

    logger = MetricsLogger(out, info.is_main, total_steps=stop, start_step=start_step, progress=progress)
    if start_step >= stop:
        logger.message(f"the run is at step {start_step}, the steps asked for end at {stop}: nothing to "
                       "train")
    flops_per_image = method.flops_per_image() if hasattr(method, "flops_per_image") else None
    peak = device_peak_tflops(device, precision)

    step = start_step
    epoch, start_micro = _data_position(saved, start_step, steps_per_epoch, e.grad_accum, cfg, info)
    micro_per_epoch = steps_per_epoch * e.grad_accum
    keep_fp32 = getattr(method, "keeps_fp32_images", False)  # pixel targets from fp32 pixels (Method)
    losses: list[tuple[int, float]] = []
    sums = StepSums(device)
    sched = Schedule.of(e, base_lr, total, warmup)
    last_ckpt: Path | None = resume_dir
    t_last, step_last = time.perf_counter(), step

    def log_and_check(final: bool = False) -> None:
        nonlocal t_last, step_last
        _settle_health(health, out, info, logger)
        bad = int(all_reduce_max(sums.first_bad).item()) if precision != "fp16" else -1
        if bad >= 0 and e.on_nonfinite == "stop":
            newest = health.newest_good()
            raise NonFiniteLossError(bad, str(newest) if newest else None)
        acc, n_acc = sums.take()
        if n_acc == 0:
            return
        keys = sorted(acc)
        vec = all_reduce_mean(torch.stack([acc[k] for k in keys]) / n_acc).tolist()
        now = time.perf_counter()
        dt = max(now - t_last, 1e-9)
        ips = (step - step_last) * global_batch / dt
        rec = {"step": step, "epoch": step // steps_per_epoch, "loss": vec[keys.index("loss")],
               "lr": sched.lr(step - 1), "imgs_per_s": ips,
               "step_s": dt / max(1, step - step_last), "mem_gb": peak_memory_gb(device),
               "skipped": int(getattr(engine, "skipped_steps", 0))}
        rec.update({k: v for k, v in zip(keys, vec) if k != "loss"})
        if e.weight_decay_end is not None:
            rec["wd"] = sched.wd(step - 1)
        if flops_per_image is not None:
            tflops = flops_per_image * ips / info.world_size / 1e12
            rec["tflops"] = tflops
            if peak:
                rec["mfu"] = tflops / peak
        if precision == "fp16":
            rec["loss_scale"] = float(engine.optimizer.cur_scale) if hasattr(engine.optimizer, "cur_scale") \
                else None
        losses.append((step, rec["loss"]))
        health.observe(step, rec["loss"])
        logger.log(rec)
        t_last, step_last = time.perf_counter(), step

    try:
        while step < stop:
            micro = start_micro
            # Each sample's global key: masks and views are drawn per sample from it (fastmask.draws),
            # so they do not depend on the world size, the per-rank batch or a resume.
            sample_keys = torch.from_numpy(np.ascontiguousarray(loader.sample_keys(epoch)))
            for imgs in itertools.islice(loader.epoch(epoch, start_micro), micro_per_epoch - start_micro):
                if step >= stop:
                    break
                if micro % e.grad_accum == 0:
                    lr = sched.apply(optimizer, step, decaying)
                keys = sample_keys[micro].to(device, non_blocking=True)
                outputs = micro_step(engine, imgs, keys, dtype, keep_fp32)
                health.capture(step, sums.add(step, outputs))
                micro += 1
                if micro % e.grad_accum:
                    continue
                step += 1
                after_step(method, step, total, lr)
                logger.advance()
                _crash_point(step)
                signum = stop_signal.requested()
                if step % e.log_every == 0 or step == stop or signum:
                    log_and_check()
                if out is not None and ((e.checkpoint_every and step % e.checkpoint_every == 0)
                                        or step == stop or signum):
                    log_and_check()  # never checkpoint a run that went non-finite
                    state = _engine_state(cfg, step, steps_per_epoch, micro_per_epoch, info, precision, total,
                                          engine)
                    state.update(schedule=schedule, params=signature,
                                 health=health.judge(step, engine.module))
                    # Pruning keeps the newest good checkpoint whose first loss was checked: this one's
                    # verdict stays provisional until the next step's loss is known.
                    last_ckpt = ckpt.save(engine, out, step, state, config_yaml, info.rank, e.keep_last,
                                          health.newest_good(checked=True))
                    health.saved(step, last_ckpt, state["health"])
                if signum and step < stop:
                    raise StoppedBySignal(signum, step, str(last_ckpt) if out is not None else None)
            epoch, start_micro = epoch + 1, 0
    finally:
        logger.close()
    return RunResult(step=step, total_steps=total, losses=losses,
                     resumed_from=start_step if saved is not None else None,
                     skipped_steps=int(getattr(engine, "skipped_steps", 0)), out=out,
                     last_checkpoint=last_ckpt)


def _settle_health(health: CheckpointHealth, out: Path | None, info: DistInfo, logger: MetricsLogger) -> None:
    """Judge the first loss from the newest checkpoint's weights; record a failing one as not good."""
    failed = health.settle(all_reduce_mean)
    if failed is None:
        return
    folder, why = failed
    if info.is_main and out is not None and folder.is_dir():
        ckpt.mark_not_good(folder, why)
    logger.message(f"checkpoint {folder} is not good: {why}")


def _arg_defaults(method) -> dict:
    args = getattr(type(method), "Args", None)
    try:
        return dataclasses.asdict(args()) if args is not None else {}
    except TypeError:  # an Args with required fields
        return {}


def _engine_state(cfg: Config, step: int, steps_per_epoch: int, micro_per_epoch: int, info: DistInfo,
                  precision: str, total: int, engine) -> dict:
    import deepspeed

    import fastmask
    return {
        "step": step, "epoch": step // steps_per_epoch,
        "batch_in_epoch": (step % steps_per_epoch) * cfg.engine.grad_accum,  # micro-batches done this epoch
        "micro_batches_per_epoch": micro_per_epoch,
        "samples_seen": step * cfg.data.batch_size * cfg.engine.grad_accum * info.world_size,
        "world_size": info.world_size, "zero_stage": cfg.engine.zero_stage, "precision": precision,
        "micro_batch": cfg.data.batch_size, "grad_accum": cfg.engine.grad_accum, "total_steps": total,
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "versions": {"fastmask": fastmask.__version__, "deepspeed": deepspeed.__version__,
                     "torch": torch.__version__},
        "config": to_dict(cfg),
    }


def _data_position(saved: dict | None, step: int, steps_per_epoch: int, grad_accum: int, cfg: Config,
                   info: DistInfo) -> tuple[int, int]:
    """-> (epoch, micro-batch to start at) for a run at optimizer step `step`."""
    if saved is None or (saved["world_size"] == info.world_size
                         and saved["micro_batch"] == cfg.data.batch_size
                         and saved["grad_accum"] == grad_accum):
        return step // steps_per_epoch, (step % steps_per_epoch) * grad_accum
    # A different world size or batch: continue the saved epoch at the first batch holding unseen
    # samples (the samples of a global batch are the same whatever the world size, so this is
    # exact whenever the old position is a multiple of the new global batch).
    old_global = saved["micro_batch"] * saved["world_size"]
    seen_in_epoch = saved["batch_in_epoch"] * old_global
    new_global = cfg.data.batch_size * info.world_size
    start = math.ceil(seen_in_epoch / new_global)
    start -= start % grad_accum
    if seen_in_epoch % new_global:
        warnings.warn(f"resuming with a different global batch: epoch {saved['epoch']} continues at "
                      f"micro-batch {start}, so up to {new_global - 1} samples of this epoch are skipped",
                      stacklevel=2)
    return saved["epoch"], start


def _needs_universal(saved: dict, world_size: int, stage: int, where: Path, optimizer: str = "adamw") -> bool:
    """Whether resuming `saved` here needs DeepSpeed's universal format; a clear error where it cannot
    work."""
    old_stage, old_world = saved["zero_stage"], saved["world_size"]
    if old_stage == stage and (old_world == world_size or stage == 0):
        return False  # same partitioning, or stage 0 whose optimizer state is whole
    if optimizer in ("sgd", "lars"):
        raise ConfigError(f"cannot resume {where} (ZeRO stage {old_stage}, {old_world} rank(s)) with ZeRO "
                          f"stage {stage} on {world_size} rank(s) and engine.optimizer={optimizer}: "
                          "DeepSpeed's universal checkpoint conversion, which re-partitions ZeRO optimizer "
                          "state, knows only Adam's state (deepspeedai/DeepSpeed#8608). Resume with "
                          f"engine.zero_stage={old_stage} on {old_world} rank(s), or start a new run from "
                          f"its weights with engine.init_from={where}.")
    family = {0: "stage 0", 1: "stages 1-2", 2: "stages 1-2", 3: "stage 3"}
    if family[old_stage] != family[stage]:
        # DeepSpeed's universal checkpoint (0.19) converts within stages 1-2 and within stage 3
        # (its per-parameter files differ between the two); stage 0 needs no conversion at all.
        raise ConfigError(f"cannot resume {where} (ZeRO stage {old_stage}, {old_world} rank(s)) with ZeRO "
                          f"stage {stage} on {world_size} rank(s): resuming converts only within stage 0, "
                          "within stages 1-2 and within stage 3 (any world size). Resume with "
                          f"engine.zero_stage={old_stage}, or start a new run from its weights with "
                          f"engine.init_from={where} (the optimizer state starts fresh).")
    return True
