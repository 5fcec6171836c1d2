"""Per-rank memory of ZeRO stages for an MAE model: model-state bytes and peak RSS, a few steps on CPU.

    python benchmarks/bench_zero_memory.py                      # ViT-L MAE, ZeRO 0 and 3, 2 ranks
    python benchmarks/bench_zero_memory.py --stages 0,1,2,3 --model vit_base_patch16 --ranks 2
    python benchmarks/bench_zero_memory.py --stages 3 --model vit_huge_patch14 --config mae_vit_huge_patch14 \
        --img-size 56

The driver launches one `torchrun --standalone --nproc_per_node RANKS` per stage (a fresh process
per stage, so peak RSS belongs to that stage), each building the method as the engine does (at
ZeRO-3 partitioned as it is built, `fastmask.engine.zero.construct`) and running `--steps` optimizer
steps (DeepSpeed, fp32 on CPU, synthetic data, tiny batch: activations stay small, so the figures
are the model states). Each rank reports:
- param_bytes: the module's parameters held by this rank (ZeRO-3: its partition `ds_tensor`);
- optim_bytes: the optimizer's tensors on this rank: fp32 master partitions (stages 1-3) and AdamW's
  exp_avg / exp_avg_sq (whole at stage 0, partitioned at 1-3);
- total_state_bytes: unique storages of the two (shared tensors counted once);
- peak_rss_build_bytes: peak resident memory once the method is built (construction's peak);
- peak_rss_bytes: the process's peak resident memory (ru_maxrss), everything included;
- rss_phases: (phase, peak RSS so far, RSS now) after imports, construction, deepspeed.initialize
  and each forward / backward / optimizer step: where the peak comes from.
Prints a table and writes JSON (device, versions, shapes, per-rank figures) to --out.

Peak RSS and glibc: ZeRO-3 gathers and frees every layer's weights in every forward and backward;
with glibc's default (dynamic) mmap threshold the freed buffers stay resident, so the engine fixes
the threshold on CPU ZeRO-3 runs (`fastmask.engine.zero.release_freed_host_memory`, called by
`construct`, as here). A stage written with a `g` (`--stages 3,3g`) runs without it, to measure
what it saves side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _measure(engine, optimizer) -> dict:
    import torch

    seen: set[int] = set()

    def add(t) -> int:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return 0
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    params = 0
    for p in engine.module.parameters():
        params += add(getattr(p, "ds_tensor", p))
    optim = 0
    inner = optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            optim += add(p)
    for st in inner.state.values():
        for v in st.values():
            optim += add(v)
    zero = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(zero, name, []) or []:
            optim += add(t)
    return {"param_bytes": params, "optim_bytes": optim, "total_state_bytes": params + optim,
            "peak_rss_bytes": _peak_rss(),
            "num_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                              for p in engine.module.parameters())}


def worker(args) -> None:
    """One rank of one stage (under torchrun)."""
    import deepspeed
    import torch

    from fastmask.data import build_loader
    from fastmask.engine.config import load_config
    from fastmask.engine.distributed import dist_info, init_distributed
    from fastmask.engine.trainer import build_ds_config, build_optimizer
    from fastmask.engine import zero
    from fastmask.engine.zero import construct, share_fp32_master
    from fastmask.methods import build_method

    cfg = load_config(args.config, [f"model={args.model}", f"data.img_size={args.img_size}",
                                    f"data.batch_size={args.batch}", "data.loader=synthetic",
                                    "data.synthetic_size=4096",
                                    f"engine.zero_stage={args.stage}", "engine.precision=fp32"])
    info = dist_info()
    if args.glibc_default:
        zero.release_freed_host_memory = lambda *a, **k: False  # what construct() would call
    torch.manual_seed(0)
    ds_config = build_ds_config(cfg, info.world_size, "fp32", info.device)
    phases = [("imported", _peak_rss(), _rss())]  # (phase, peak RSS so far, RSS now)
    init_distributed(info)
    method = construct(lambda: build_method(cfg), cfg, info, ds_config)
    phases.append(("built", _peak_rss(), _rss()))
    opt = build_optimizer(cfg.engine.optimizer, method.param_groups(cfg.engine.weight_decay), 1e-4,
                          cfg.engine, info.device)  # the engine's optimizer (AdamW, fused on CPU too)
    engine, *_ = deepspeed.initialize(model=method, optimizer=opt, config=ds_config)
    share_fp32_master(engine)
    phases.append(("initialized", _peak_rss(), _rss()))
    loader = build_loader(cfg.data, info.rank, info.world_size, seed=0, device=info.device)
    t0 = time.perf_counter()
    for i, imgs in zip(range(args.steps), loader.epoch(0)):
        loss = engine(imgs)["loss"]
        phases.append((f"forward {i}", _peak_rss(), _rss()))
        engine.backward(loss)
        phases.append((f"backward {i}", _peak_rss(), _rss()))
        engine.step()
        phases.append((f"step {i}", _peak_rss(), _rss()))
    step_s = (time.perf_counter() - t0) / args.steps
    rec = {"rank": info.rank, "stage": args.stage, "loss": float(loss), "step_s": step_s,
           "peak_rss_build_bytes": phases[1][1], "rss_phases": phases, **_measure(engine, opt)}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{args.result}.rank{info.rank}", "w") as f:
        json.dump(rec, f)


def driver(args) -> None:
    import deepspeed
    import torch

    torchrun = Path(sys.executable).parent / "torchrun"
    sha = _git_sha()  # the code measured (taken before the runs)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="zero_mem_"))
    for spec in args.stages.split(","):
        stage, glibc_default = int(spec.rstrip("g")), spec.endswith("g")
        res = tmp / f"stage{spec}"
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(args.ranks), __file__, "--worker",
               "--stage", str(stage), "--result", str(res), "--model", args.model,
               "--img-size", str(args.img_size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--config", args.config,
               *(["--glibc-default"] if glibc_default else [])]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
        for r in range(args.ranks):
            results.append({**json.loads(Path(f"{res}.rank{r}").read_text()),
                            "host_malloc": "glibc default" if glibc_default else "as the engine"})
    gib = 2**30
    print(f"MAE {args.model} ({results[0]['num_params'] / 1e6:.1f} M params), fp32 AdamW, {args.ranks} CPU "
          f"ranks, img {args.img_size}, batch {args.batch}/rank, {args.steps} steps")
    print(f"{'stage':>5} {'rank':>4} {'params GiB':>10} {'optim GiB':>10} {'states GiB':>10} "
          f"{'build RSS GiB':>13} {'peak RSS GiB':>12} {'s/step':>7}")
    for r in results:
        stage = f"{r['stage']}{'g' if r['host_malloc'] == 'glibc default' else ''}"
        print(f"{stage:>5} {r['rank']:>4} {r['param_bytes'] / gib:>10.3f} {r['optim_bytes'] / gib:>10.3f} "
              f"{r['total_state_bytes'] / gib:>10.3f} {r['peak_rss_build_bytes'] / gib:>13.3f} "
              f"{r['peak_rss_bytes'] / gib:>12.3f} {r['step_s']:>7.2f}")
    out = {"benchmark": "zero_memory", "command": "python " + " ".join(sys.argv), "model": args.model,
           "img_size": args.img_size, "batch_per_rank": args.batch,
           "ranks": args.ranks, "steps": args.steps, "precision": "fp32", "device": "cpu",
           "fastmask_git": sha, "loadavg_end": os.getloadavg(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                        "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="0,3", help="ZeRO stages, in order; 3g: stage 3 with glibc's default "
                                                      "mmap threshold (see the module docstring)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--model", default="vit_large_patch16")
    p.add_argument("--config", default="mae_vit_large_patch16")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--glibc-default", action="store_true", help=argparse.SUPPRESS)  # a stage written with g
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
