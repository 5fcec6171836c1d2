"""Compile every Triton kernel of fastmask.kernels for a GPU as its launcher launches it, without a GPU,
and print registers, spills and shared memory per kernel.

    python -m fastmask.kernels._compile_check [--arch 80 90] [--full] [--head-dims 48 128]
                                              [--kernels bias_gelu ...] [--json rows.json]

The CPU interpreter runs the kernels' arithmetic but not Triton's GPU code generator, so a kernel can
pass every interpreter test and still fail to compile for a GPU, or compile into a register-hungry,
spilling kernel. Here every launcher in fastmask.kernels runs at MAE shapes on meta tensors (no memory,
no device) while `JITFunction.run` and `Autotuner.run` are replaced by a recorder, so what gets
compiled is exactly what the launcher would launch: its block sizes, warps, stages and constexprs, and
Triton's own specialization of the arguments (i32 or i64 per integer value, 16-byte divisibility of
pointers and integers, integers equal to 1). Each recorded launch is lowered to a cubin for the target
architecture with the ptxas that ships with triton; ptxas -v on the same PTX reports the registers and
spills. Autotuned kernels compile every config.

Default: bf16 at MAE-L/16 shapes (batch 256, 224 px, mask 0.75, decoder 512 wide); --full: ViT-B/L/H in
bf16, fp16 and fp32. Must run where TRITON_INTERPRET is not 1 (kernels are decorated at import time).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# (patch, encoder dim, heads), as benchmarks/bench_ops.py; the decoder is 512 wide, 16 heads, for all.
MODELS = {"vit_b": (16, 768, 12), "vit_l": (16, 1024, 16), "vit_h": (14, 1280, 16)}
BATCH, IMG, MASK_RATIO, DEC_DIM, DEC_HEADS = 256, 224, 0.75, 512, 16


@dataclass
class Row:
    arch: str
    kernel: str
    case: str
    regs: int
    spill_stores: int
    spill_loads: int
    shared: int
    num_warps: int


class _FakePtr:
    """A tensor argument as Triton's binder sees it: a dtype and a data pointer. Meta tensors have none;
    this one is 256-byte aligned plus the view's storage offset, as a caching-allocator block would be."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


@contextlib.contextmanager
def recording():
    """Inside: Triton launches are recorded as (jit function, args, kwargs, configs) instead of run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, [None]))

    def record_tuner(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))  # what prune_configs reads, as in Autotuner.run
        launches.append((self.fn, args, kwargs, list(self.prune_configs(kwargs))))
        self.nargs = None

    JITFunction.run, Autotuner.run = record_jit, record_tuner
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v on the PTX Triton generated."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o",
                              os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1,
            int(spills.group(1)) if spills else -1, int(spills.group(2)) if spills else -1)


def compile_launch(fn, args, kwargs, config, arch: int):
    """Specialize one recorded launch with Triton's binder for `arch` and compile it -> (compiled, label)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if config is not None:
        kwargs = {**kwargs, **config.all_kwargs()}
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    fake = [_FakePtr(a) if isinstance(a, torch.Tensor) else a for a in args]
    bound, spec, options = binder(*fake, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=backend.target,
                              options=options.__dict__)
    names = [p.name for p in fn.params]
    consts = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    wide = [n for n, t in signature.items() if t == "i64"]
    label = " ".join(f"{k}={v}" for k, v in consts.items() if v is not False)
    label += f" nw={options.num_warps} ns={options.num_stages}" + (f" i64:{','.join(wide)}" if wide else "")
    return compiled, label


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype)


def cases(full: bool = False, head_dims: tuple[int, ...] = ()):
    """Yield (case label, thunk): each thunk calls launchers on meta tensors at one model's MAE shapes."""
    import torch

    from . import attention as at, bias_gelu as bg, layer_norm as ln, norm_pix_loss as nl, patch_gather as pg
    from . import patch_scatter as ps

    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)
    models = MODELS if full else {"vit_l": MODELS["vit_l"]}
    for dt in dtypes:
        f32 = torch.float32
        for name, (p, dim, heads) in models.items():
            tag = f"{name} {str(dt).replace('torch.', '')}"
            L = (IMG // p) ** 2
            K = int(L * (1 - MASK_RATIO))
            P = p * p * 3
            B = BATCH
            ids_keep = _meta(B, K, dtype=torch.int64)
            ids_restore = _meta(B, L, dtype=torch.int64)

            def gather(dt=dt, p=p, ids_keep=ids_keep, B=B, K=K, P=P):
                pg.patch_gather_fwd(_meta(B, 3, IMG, IMG, dtype=dt), ids_keep, p)
                pg.patch_gather_bwd(_meta(B, K, P, dtype=dt), ids_keep, 3, IMG, IMG, p)

            def loss(dt=dt, p=p, B=B, L=L, P=P):
                pred = _meta(B, L + 1, P, dtype=dt)[:, 1:]  # MAE drops the decoder's cls row: a strided view
                imgs, mask = _meta(B, 3, IMG, IMG, dtype=f32), _meta(B, L, dtype=f32)
                nl.norm_pix_loss_fwd(pred, imgs, mask, p, True)
                nl.norm_pix_loss_bwd(_meta((), dtype=f32), pred, imgs, mask, p, True)

            def scatter(dt=dt, ids_restore=ids_restore, B=B, L=L, K=K):
                ps.patch_scatter_fwd(_meta(B, K, DEC_DIM, dtype=dt), ids_restore, _meta(DEC_DIM, dtype=f32))
                ps.patch_scatter_bwd(_meta(B, L, DEC_DIM, dtype=dt), ids_restore, K)

            def unshuffle(dt=dt, ids_restore=ids_restore, B=B, L=L, K=K):
                # as the MAE decoder calls it: dt tokens, fp32 parameters, an fp32 stream out
                pos = _meta(1, L + 1, DEC_DIM, dtype=f32)[0]
                ps.patch_scatter_fwd(_meta(B, K + 1, DEC_DIM, dtype=dt), ids_restore,
                                     _meta(DEC_DIM, dtype=f32), pos, cls=True, out_dtype=f32)
                ps.patch_scatter_bwd(_meta(B, L + 1, DEC_DIM, dtype=f32), ids_restore, K, cls=True,
                                     tok_dtype=dt)

            def block_ops(m, d, dt=dt):
                # as the fused chain runs under autocast: branch outputs in dt, the residual stream in fp32
                x, w, stream = _meta(m, d, dtype=dt), _meta(d, dtype=f32), _meta(m, d, dtype=f32)
                y, h, mean, rstd = ln.layer_norm_fwd(x, stream, w, w, 1e-6, residual_dtype=f32)
                ln.layer_norm_bwd(y, h, w, mean, rstd, stream, dt, f32)
                if full:  # a model held in dt throughout: one gradient tensor for dx and dresidual
                    y, h, mean, rstd = ln.layer_norm_fwd(x, x, w, w, 1e-6)
                    ln.layer_norm_bwd(y, h, w, mean, rstd, y, dt, dt)
                u, b = _meta(m, 4 * d, dtype=dt), _meta(4 * d, dtype=f32)
                bg.bias_gelu_fwd(u, b)
                bg.bias_gelu_bwd(u, u, b)

            def attention(H, n, dh, dt=dt, B=B):
                # q, k, v as the model makes them: strided views of one [B, N, 3, H, Dh] projection
                q, k, v = _meta(B, n, 3, H, dh, dtype=dt).permute(2, 0, 3, 1, 4).unbind(0)
                out, lse = at.attention_fwd(q, k, v)
                at.attention_bwd(out, q, k, v, out, lse)

            enc, dec = (B * (K + 1), dim), (B * (L + 1), DEC_DIM)
            yield f"{tag} patch_gather [{B}, 3, {IMG}, {IMG}] K={K}", gather
            yield f"{tag} norm_pix_loss [{B}, {L}, {P}]", loss
            yield f"{tag} patch_scatter [{B}, {K}, {DEC_DIM}] L={L}", scatter
            yield f"{tag} decoder_unshuffle [{B}, {K + 1}, {DEC_DIM}] L={L}", unshuffle
            yield f"{tag} encoder add_layer_norm/bias_gelu [{enc[0]}, {enc[1]}]", lambda e=enc: block_ops(*e)
            yield f"{tag} decoder add_layer_norm/bias_gelu [{dec[0]}, {dec[1]}]", lambda e=dec: block_ops(*e)
            for where, H, n, dh in [("encoder", heads, K + 1, dim // heads),
                                    ("decoder", DEC_HEADS, L + 1, DEC_DIM // DEC_HEADS)] + \
                                   [("encoder", heads, K + 1, d) for d in head_dims]:
                yield f"{tag} {where} attention B={B} H={H} N={n} Dh={dh}", \
                    lambda H=H, n=n, dh=dh: attention(H, n, dh)


def check(archs=(90,), full: bool = False, head_dims: tuple[int, ...] = (), kernels: tuple[str, ...] = (),
          log=print) -> list[Row]:
    """Compile every recorded launch (of the kernels whose names contain one of `kernels`, default all)
    for every arch; raises on the first kernel that does not compile."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    rows, seen = [], set()
    log(f"{'arch':6} {'regs':>4} {'spill st/ld':>11} {'smem':>6}  {'kernel':34} case")
    for label, thunk in cases(full, head_dims):
        with recording() as launches:
            thunk()
        for fn, args, kwargs, configs in launches:
            if kernels and not any(k in fn.__name__ for k in kernels):
                continue
            for config in configs:
                for arch in archs:
                    compiled, spec = compile_launch(fn, args, kwargs, config, arch)
                    key = (arch, compiled.hash)
                    if key in seen:
                        continue
                    seen.add(key)
                    regs, st, ld = _ptxas_report(compiled.asm["ptx"], arch)
                    row = Row(f"sm_{arch}", fn.__name__, f"{label}: {spec}", regs, st, ld,
                              compiled.metadata.shared, compiled.metadata.num_warps)
                    rows.append(row)
                    log(f"{row.arch:6} {regs:>4} {f'{st}/{ld}':>11} {row.shared:>6}  {row.kernel:34} "
                        f"{row.case}")
    spilling = [r for r in rows if r.spill_stores or r.spill_loads]
    log(f"{len(rows)} kernel builds, {len(spilling)} with spills")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90],
                    help="compute capabilities x 10 (80 = A100, 90 = H100/H200)")
    ap.add_argument("--full", action="store_true", help="ViT-B/L/H in bf16, fp16 and fp32")
    ap.add_argument("--head-dims", type=int, nargs="*", default=[],
                    help="extra attention head dims at the encoder's shape (e.g. 48 96 128 256)")
    ap.add_argument("--kernels", nargs="*", default=[], help="only kernels whose names contain one of these")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    rows = check(tuple(a.arch), a.full, tuple(a.head_dims), tuple(a.kernels))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
