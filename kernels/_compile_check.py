"""Compile every Triton kernel of fastmask.kernels for a CUDA architecture, without a GPU.

    TRITON_INTERPRET=0 python -m fastmask.kernels._compile_check [--arch 90] [--full]

The CPU interpreter runs the kernels' arithmetic but not Triton's GPU code generator, so a kernel can
pass every interpreter test and still fail to compile for a GPU (a dot-shape rule, a layout
conversion, shared memory). This lowers each kernel to a cubin with the block sizes its launcher
would pick, using the ptxas that ships with triton, and prints the static shared memory. Default: one
dtype (bf16) and the head dims of ViT-B/L/H and the decoder; --full: fp32/fp16/bf16 and head dims 32-256.
Must run in a process where TRITON_INTERPRET is not 1 (the kernels are decorated at import time).
"""
from __future__ import annotations

import argparse
import os
import sys


def _compile(kernel, types: dict, consts: dict, target, num_warps: int = 4, num_stages: int = 3) -> int:
    import triton
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=target,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.metadata.shared


def check(arch: int = 90, full: bool = False, head_dims: tuple[int, ...] = (32, 64, 80),
          log=print) -> list[tuple]:
    """-> [(kernel, variant, shared bytes)]; raises on the first kernel that does not compile."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    import torch
    from triton.backends.compiler import GPUTarget

    from . import attention as at, norm_pix_loss as nl, patch_gather as pg, patch_scatter as ps
    from ._common import next_pow2

    target = GPUTarget("cuda", arch, 32)
    out = []

    def run(kernel, variant, types, consts, nw=4, ns=3):
        out.append((kernel.__name__, variant, _compile(kernel, types, consts, target, nw, ns)))
        log(*out[-1])

    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16",)
    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dt in dtypes:
        for P in ((768, 588) if full else (588,)):  # p=16 and p=14 patches (588 is padded to 1024)
            bp = min(next_pow2(P), 1024)
            br = max(1, 4096 // bp)
            blk = {"BLOCK_R": br, "BLOCK_P": bp}
            run(pg._patch_gather_fwd_kernel, f"{dt} P={P}",
                {"imgs_ptr": f"*{dt}", "ids_ptr": "*i64", "out_ptr": f"*{dt}"}, blk)
            run(pg._patch_gather_bwd_kernel, f"{dt} P={P}",
                {"grad_ptr": f"*{dt}", "inv_ptr": "*i32", "gimg_ptr": f"*{dt}"}, blk)
            br, bp, nw = nl._config(P)
            for norm in (True, False):
                blk = {"NORM": norm, "BLOCK_R": br, "BLOCK_P": bp}
                run(nl._norm_pix_loss_fwd_kernel, f"{dt} P={P} norm={norm}",
                    {"pred_ptr": f"*{dt}", "imgs_ptr": "*fp32", "mask_ptr": "*fp32", "part_ptr": "*fp32",
                     "eps": "fp32"}, blk, nw)
                run(nl._norm_pix_loss_bwd_kernel, f"{dt} P={P} norm={norm}",
                    {"pred_ptr": f"*{dt}", "imgs_ptr": "*fp32", "mask_ptr": "*u8", "coef_ptr": "*fp32",
                     "gpred_ptr": f"*{dt}", "eps": "fp32"}, blk, nw)
        br, bd = ps._blocks(512)
        run(ps._patch_scatter_fwd_kernel, f"{dt} D=512",
            {"tok_ptr": f"*{dt}", "ids_ptr": "*i64", "mtok_ptr": f"*{dt}", "out_ptr": f"*{dt}"},
            {"BLOCK_R": br, "BLOCK_D": bd})
        run(ps._patch_scatter_bwd_kernel, f"{dt} D=512",
            {"gout_ptr": f"*{dt}", "ids_ptr": "*i64", "gtok_ptr": f"*{dt}", "gmask_part_ptr": "*fp32"},
            {"BLOCK_R": min(br, 32), "BLOCK_D": bd})
        ptrs = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
        ptrs.update(LSE="*fp32", DELTA="*fp32", qk_scale="fp32", sm_scale="fp32")
        for dh in ((32, 48, 64, 80, 96, 128, 256) if full else head_dims):
            bdh = max(16, next_pow2(dh))
            flags = {"IEEE": dt == "fp32", "INTERP_BF16": False}
            bm, bn, nw, ns = at._config(torch_dt[dt], bdh)
            run(at._attention_fwd_kernel, f"{dt} Dh={dh}", ptrs,
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bdh, **flags}, nw, ns)
            bm, bn, nw, ns = at._config(torch_dt[dt], bdh, backward=True)
            run(at._attention_bwd_delta_kernel, f"{dt} Dh={dh}", ptrs, {"BLOCK_M": bm, "BLOCK_D": bdh})
            for k in (at._attention_bwd_dkdv_kernel, at._attention_bwd_dq_kernel):
                run(k, f"{dt} Dh={dh}", ptrs, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bdh, **flags}, nw, ns)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 = A100, 90 = H100)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 80])
    a = ap.parse_args(argv)
    check(a.arch, a.full, tuple(a.head_dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
