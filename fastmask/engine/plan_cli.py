"""`fastmask plan --config RECIPE --gpus N --gpu-memory GIB --global-batch B [--json] [key=value ...]`

    fastmask plan --config mae_vit_huge_patch14 --gpus 64 --gpu-memory 80 --global-batch 4096
    fastmask plan --config extrema_vit_base --gpus 8 --stage 3 --offload-optimizer cpu --json

Per ZeRO stage (0-3) and with/without activation checkpointing: bytes per GPU of parameters,
gradients, optimizer states and activations, the largest micro-batch that fits, the gradient
accumulation the global batch then needs, the bytes each GPU sends per step, and an estimated step
time and images/s. Nothing is allocated: the method is measured on data-less tensors
(`fastmask.engine.footprint`; `fastmask.engine.plan` gives every formula). Bad input, and a model
that fits in no row even at micro-batch 1, print one error line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json

from .plan import FORMULAS, SEARCH_TO, Hardware

_HW = Hardware()  # the one home of the hardware defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 2)[2].strip()
    parser.epilog = "formulas:\n" + "\n".join(f"  {k}: {v}" for k, v in FORMULAS.items())
    parser.add_argument("--config", default=None, help="a shipped recipe name or a YAML path "
                        "(default: mae_tiny, or <method>_tiny when method=<name> is given)")
    parser.add_argument("--gpus", type=int, default=_HW.gpus,
                        help="data-parallel GPUs (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=_HW.gpus_per_node, help="(default: %(default)s)")
    parser.add_argument("--gpu-memory", type=float, default=_HW.gpu_memory_gib,
                        help="GiB per GPU (default: %(default)s, an H100 80 GB)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="images per optimizer step, all GPUs (default: the config's data.batch_size x "
                             "engine.grad_accum x --gpus)")
    parser.add_argument("--stage", type=int, action="append", choices=(0, 1, 2, 3), default=None,
                        help="ZeRO stage to plan (repeatable; default: all four)")
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                        help="rows with activation checkpointing on, off or both (default: %(default)s)")
    parser.add_argument("--offload-optimizer", choices=("none", "cpu", "nvme"), default="none",
                        help="DeepSpeed optimizer offload, stages 1-3 (default: %(default)s)")
    parser.add_argument("--offload-params", choices=("none", "cpu", "nvme"), default="none",
                        help="DeepSpeed parameter offload, stage 3 (default: %(default)s)")
    parser.add_argument("--mfu", type=float, default=_HW.mfu,
                        help="fraction of peak FLOP/s the step's counted FLOPs reach (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOP/s per GPU (default: the H100 SXM datasheet figure for the "
                             "precision: 989 bf16/fp16, 66.9 fp32)")
    parser.add_argument("--intra-node-bw", type=float, default=_HW.intra_node_gbps,
                        help="GB/s each GPU sends inside a node (default: %(default)s, NVLink 4)")
    parser.add_argument("--inter-node-bw", type=float, default=_HW.inter_node_gbps,
                        help="GB/s each GPU sends between nodes (default: %(default)s, InfiniBand NDR "
                             "400 Gb/s)")
    parser.add_argument("--headroom", type=float, default=_HW.headroom,
                        help="fraction of GPU memory kept free for the CUDA context, communication buckets, "
                             "fragmentation and backward temporaries (default: %(default)s)")
    parser.add_argument("--overlap", type=float, default=_HW.overlap,
                        help="fraction of communication hidden behind compute (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.img_size=448 engine.precision=fp32")


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _summary(p: dict) -> list[str]:
    c, hw, n = p["config"], p["hardware"], p["params"]
    lines = [f"fastmask plan: {c['method']} {c['model']} at {c['img_size']} px, {c['precision']}; "
             f"{hw['gpus']} GPUs ({hw['gpus_per_node']} per node) x {hw['gpu_memory_gib']:g} GiB; "
             f"global batch {p['global_batch']} ({p['per_gpu_batch']} per GPU)",
             f"parameters: {n['trainable'] / 1e6:.1f}M trainable, {n['frozen'] / 1e6:.1f}M frozen "
             f"({n['ema_teacher'] / 1e6:.1f}M EMA teacher), largest layer {n['largest_layer'] / 1e6:.2f}M"]
    for mode, m in p["measured"].items():
        if isinstance(m, str):
            lines.append(f"measured ({mode}): n/a: {m}")
            continue
        s, f = m["saved_bytes"], m["flops"]
        square = f" + {s['c2'] / 2**20:.4f} MiB x B^2" if s["c2"] else ""
        lines.append(f"measured ({mode}): activations {s['c0'] / 2**20:.1f} MiB + {s['c1'] / 2**20:.2f} "
                     f"MiB x B{square}; forward + backward {f['c1'] / 1e9:.1f} GFLOP per image")
    lines.append(f"assumed: {hw['peak_tflops']:g} TFLOP/s peak x MFU {hw['mfu']:g}; "
                 f"{hw['intra_node_gbps']:g} GB/s intra-node, {hw['inter_node_gbps']:g} GB/s inter-node "
                 f"per GPU; headroom {hw['headroom']:g}; overlap {hw['overlap']:g}; "
                 f"offload optimizer={p['offload_optimizer']} "
                 f"params={p['offload_params']} (formulas: --help, --json)")
    return lines


def format_plan(p: dict) -> str:
    head = ("stage", "ckpt", "params", "grads", "optim", "act/img", "act", "total", "max B", "B x accum",
            "comm/step", "step", "img/s")
    units = ("", "", "GiB", "GiB", "GiB", "MiB", "GiB", "GiB", "", "", "GB", "ms", "")
    rows, cap = [], p["per_gpu_batch"] * SEARCH_TO
    for r in p["rows"]:
        cells = [str(r["stage"]), "on" if r["checkpointing"] else "off", _gib(r["params"]), _gib(r["grads"]),
                 _gib(r["optimizer"])]
        if r["fits"]:
            cells += [f"{r['activation_bytes_per_image'] / 2**20:.1f}", _gib(r["activations"]),
                      _gib(r["total"]), f"{r['max_micro_batch']}{'+' if r['max_micro_batch'] == cap else ''}",
                      f"{r['micro_batch']} x {r['grad_accum']}",
                      f"{r['comm_bytes'] / 1e9:.2f}", f"{r['step_s'] * 1e3:.3g}", f"{r['images_per_s']:,.0f}"]
        else:
            cells += ["-"] * 7 + [r["note"]]
        rows.append(cells)
    # The last column holds images/s, or why a row does not fit or apply: it is not padded.
    widths = [max(len(h), len(u), *(len(row[i]) for row in rows))
              for i, (h, u) in enumerate(zip(head, units))]
    widths[-1] = len(head[-1])
    table = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in (head, units, *rows)]
    offloaded = [f"stage {r['stage']} {_gib(r['offloaded'])} GiB" for r in p["rows"]
                 if r["offloaded"] and not r["checkpointing"]]
    footer = ["offloaded per GPU: " + ", ".join(offloaded)] if offloaded else []
    return "\n".join(_summary(p) + table + footer)


def main(args: argparse.Namespace) -> int:
    """Bad input raises ConfigError (a ValueError): `fastmask.cli` prints its one line and exits 2."""
    from .config import load_config
    from .plan import make_plan
    from .pretrain import default_recipe

    cfg = load_config(args.config or default_recipe(args.overrides), list(args.overrides))
    hw = Hardware(gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory,
                  peak_tflops=args.peak_tflops, mfu=args.mfu, intra_node_gbps=args.intra_node_bw,
                  inter_node_gbps=args.inter_node_bw, headroom=args.headroom, overlap=args.overlap)
    global_batch = (args.global_batch if args.global_batch is not None
                    else cfg.data.batch_size * cfg.engine.grad_accum * args.gpus)
    checkpointing = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    p = make_plan(cfg, hw, global_batch, stages=sorted(set(args.stage or (0, 1, 2, 3))),
                  checkpointing=checkpointing, offload_optimizer=args.offload_optimizer,
                  offload_params=args.offload_params)
    print(json.dumps(p, indent=1) if args.json else format_plan(p), flush=True)
    return 0
