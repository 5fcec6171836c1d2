"""What depends on the ZeRO stage besides DeepSpeed's config: partitioned construction, offload, checks.

- `check(cfg, device, registry)`: every reason the ZeRO/offload settings cannot run here, joined
  into one ConfigError before any work: offload_optimizer needs stage >= 1 and offload_params
  stage 3; `cpu` needs an accelerator to offload from (on a CPU-only run the states are in host
  memory already, so it is refused rather than silently ignored); `nvme` needs
  engine.offload_nvme_path and DeepSpeed's async_io op (libaio); and the method's own refusal
  of the stage (`Method.supported_zero_stages`, e.g. ADIOS's alternating mode at stage 3); LARS
  (per-parameter trust ratios) at stages 1-3, where DeepSpeed's optimizer sees flat partitions.
- `offload_config(engine_cfg)`: the `zero_optimization` entries for DeepSpeed's offload.
- `construct(build, cfg, info, ds_config)`: stage 3 builds the method inside `deepspeed.zero.Init`:
  every module is partitioned when its own `__init__` ends, so no rank ever holds the whole model
  (teachers, heads, position embeddings and buffers included; a parent's initialisation of its
  children goes through `Module.apply`, which zero.Init gathers one module at a time). Tensors are
  made as plain construction makes them (fp32, on the CPU, from the CPU RNG) and a module's
  parameters are cast to the run's dtype just before they are partitioned: the initial weights
  equal the stage 0-2 construction bit for bit in fp32 (bf16: up to the rounding of the weights
  a parent re-initialises). On a CPU device it also fixes glibc's mmap threshold
  (`release_freed_host_memory`). Other stages: `build()` as is.
- `release_freed_host_memory()`: ZeRO-3 gathers and frees every layer's weights in each forward
  and backward. glibc raises its mmap threshold whenever a mapped block is freed (up to 32 MiB),
  after which such blocks come from the heap, which keeps freed space resident: a CPU ZeRO-3 rank
  of MAE ViT-L then held ~4 GiB of freed buffers and peaked above ZeRO-0. A fixed 64 KiB threshold
  (what `MALLOC_MMAP_THRESHOLD_=65536` sets) unmaps them on free. The price is a page fault per
  fresh page of every large allocation. Measured side by side (MAE ViT-L, 2 CPU ranks, fp32,
  benchmarks/results/zero_memory-2026-11-30-cpu-mae_vit_large-2ranks-zero3-glibc.json): peak RSS
  per rank 4.20 GiB with it, 6.79 without (ZeRO-0: 6.88), step 38.9 s with it, 24.4 s without.
  ZeRO-3 is chosen for memory, so CPU runs take it; on an accelerator the gathered weights live in
  the device's caching allocator, and this is not done. Process-wide, for the process's lifetime.
- `share_fp32_master(engine)`: at ZeRO-3 in fp32, the optimizer's fp32 master partitions become
  the parameter partitions themselves instead of a second copy (1/world_size of the model per rank).
- `gathered(params)`: a context in which ZeRO-3 parameters are whole and writable (rank 0's
  values are broadcast on exit); a no-op for unpartitioned ones (engine.init_from uses it).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Callable, Iterable

import torch

from .config import Config, ConfigError, EngineConfig
from .distributed import DistInfo, init_distributed

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def _async_io_problem() -> str | None:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return "DeepSpeed's async_io op cannot be built here (it needs libaio: apt install libaio-dev)"


def check(cfg: Config, device: torch.device, registry: bool = True) -> None:
    """Raise one ConfigError naming every reason the ZeRO/offload settings cannot run on `device`.
    registry: the method comes from the registry (cfg.method), so its stage refusal is checked too."""
    e = cfg.engine
    problems = []
    if e.optimizer == "lars" and e.zero_stage > 0:
        problems.append("engine.optimizer=lars takes a trust ratio per parameter, but ZeRO stage "
                        f"{e.zero_stage} hands the optimizer one flat partition per param group; use "
                        "engine.zero_stage=0")
    offloads = (("offload_optimizer", e.offload_optimizer, 1), ("offload_params", e.offload_params, 3))
    for key, value, min_stage in offloads:
        if value == "none":
            continue
        if e.zero_stage < min_stage:
            problems.append(f"engine.{key}={value} needs engine.zero_stage "
                            f"{'>= 1' if min_stage == 1 else '3'} (got {e.zero_stage})")
        if value == "cpu" and device.type == "cpu":
            problems.append(f"engine.{key}=cpu moves states from accelerator memory to host memory, but this "
                            f"run has no accelerator (device cpu): they are in host memory already; use none")
    if "nvme" in (e.offload_optimizer, e.offload_params):
        if not e.offload_nvme_path:
            problems.append("nvme offload needs engine.offload_nvme_path (a folder on a local NVMe drive)")
        why = _async_io_problem()
        if why:
            problems.append(f"nvme offload: {why}")
    if registry:
        from fastmask.methods import zero_stage_refusal

        refusal = zero_stage_refusal(cfg)
        if refusal:
            problems.append(refusal)
    if problems:
        raise ConfigError("; ".join(problems))


def offload_config(e: EngineConfig) -> dict:
    """DeepSpeed `zero_optimization` entries for engine.offload_optimizer / engine.offload_params."""
    out = {}
    for key, value in (("offload_optimizer", e.offload_optimizer), ("offload_param", e.offload_params)):
        if value != "none":
            out[key] = {"device": value, "pin_memory": True,
                        **({"nvme_path": e.offload_nvme_path} if value == "nvme" else {})}
    return out


def _partitioned_init(ds_config: dict):
    import deepspeed

    class PartitionedInit(deepspeed.zero.Init):
        """zero.Init without its tensor-constructor overrides (see the module docstring): a
        module's parameters are cast to the run's dtype right before they are partitioned."""

        def _post_init_method(self, module):
            for p in module.parameters(recurse=False):
                if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != self.dtype:
                    p.data = p.data.to(self.dtype)
            super()._post_init_method(module)

    # mem_efficient_linear=False: DeepSpeed would replace torch.nn.functional.linear process-wide.
    return PartitionedInit(config_dict_or_path=ds_config, mem_efficient_linear=False, tensor_overrides=[])


def construct(build: Callable[[], torch.nn.Module], cfg: Config, info: DistInfo,
              ds_config: dict) -> torch.nn.Module:
    """The method from `build()`, partitioned at construction at ZeRO stage 3 (see the module docstring)."""
    if cfg.engine.zero_stage != 3:
        return build()
    if info.device.type == "cpu":
        release_freed_host_memory()
    init_distributed(info)
    with _partitioned_init(ds_config):
        method = build()
    if cfg.engine.offload_params == "nvme":
        from fastmask.methods.momentum import teachers

        if teachers(method):
            raise ConfigError("engine.offload_params=nvme swaps parameter partitions out to disk between "
                              f"uses, but method {cfg.method}'s EMA teacher update reads its partitions "
                              f"after every step; use engine.offload_params=cpu or none")
    return method


def release_freed_host_memory(threshold: int = 65536) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (see the module docstring).
    -> whether it was set (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt and mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD (malloc.h)


def share_fp32_master(engine) -> int:
    """ZeRO-3: where the fp32 master partition of a parameter group has the dtype and device of the
    group's parameter partitions (an fp32 run without optimizer offload), make it the same storage.
    DeepSpeed means to share them (stage3 `_create_fp32_partitions`: "we don't need another copy of
    the weights") but tests `tensor.device == device_name_string`, never true, so it keeps a copy.
    Sharing is exact: the optimizer steps the partitions in place, and DeepSpeed's copy of the
    master into the partitions becomes a copy onto itself. -> bytes freed per rank."""
    low = getattr(engine.optimizer, "fp16_partitioned_groups_flat", None) or []
    high = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or []
    freed = 0
    for lp, hp in zip(low, high):
        if (lp is not None and hp.dtype == lp.dtype and hp.device == lp.device and hp.shape == lp.shape
                and hp.untyped_storage().data_ptr() != lp.untyped_storage().data_ptr()):
            freed += hp.numel() * hp.element_size()
            hp.data = lp.data
    return freed


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter]):
    """Inside: ZeRO-3 parameters among `params` are whole; rank 0's values are kept (broadcast) on exit."""
    zero = [p for p in params if hasattr(p, "ds_id")]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=0):
        yield
