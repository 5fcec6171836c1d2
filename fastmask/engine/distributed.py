"""Process-group set-up: one code path for a plain process, the DeepSpeed launcher and torchrun.

A plain `fastmask pretrain` is world size 1: when no launcher set the rendezvous variables, we set
RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT ourselves
(otherwise DeepSpeed goes looking for MPI). `deepspeed --num_gpus N ...` and `torchrun` set them.
"""
from __future__ import annotations

import dataclasses
import os
import socket

import torch

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_rendezvous_env() -> bool:
    """Set the single-process rendezvous variables unless a launcher did. -> True when we set them."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ.get("LOCAL_RANK", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if int(os.environ["WORLD_SIZE"]) > 1:
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: launch with deepspeed or "
                                   "torchrun")
            os.environ["MASTER_PORT"] = str(free_port())
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    return True


def dist_info() -> DistInfo:
    """Rank, world size and the device of this process, from the environment (before init)."""
    ensure_rendezvous_env()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local, device)


def init_distributed(info: DistInfo) -> None:
    """Initialize DeepSpeed's (and torch.distributed's) process group once per process."""
    import deepspeed

    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    else:
        _skip_cpu_shm_op()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False)


def _skip_cpu_shm_op() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles its shared-memory comm op at init (about a minute
    on 2 cores, serialized behind a file lock across processes), yet only `inference_all_reduce` uses
    it; training's collectives go through torch.distributed (gloo). Mark it unavailable so a CPU run
    starts in seconds."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t
