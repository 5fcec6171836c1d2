"""Only what pyproject.toml cannot say: the optional CUDA extension fastmask._C (csrc/).

The extension is built when a CUDA toolkit (nvcc) and a CUDA build of torch are both importable at
build time, and skipped otherwise: fastmask works without it (the `torch` and `triton` backends).

Environment:
    FASTMASK_SKIP_CUDA_BUILD=1   never build the extension
    FASTMASK_BUILD_CUDA=1        build it or fail loudly (for CI and for users who want it)
    FASTMASK_CUDA_ARCHS          architectures, e.g. "80;90" or "8.0;9.0+PTX"; else TORCH_CUDA_ARCH_LIST;
                                 default "8.0;9.0" (A100, H100); ptxas prints registers/spills per kernel
    CUDA_HOME                    the toolkit folder; found next to `nvcc` when unset

pip builds in an isolated environment without torch, so a plain `pip install -e .` builds nothing;
to build the extension use `FASTMASK_BUILD_CUDA=1 pip install -e . --no-build-isolation`.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit folder that holds the `nvcc` on PATH.

    `nvcc` may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc),
    in which case its parent folder is no toolkit: look for one beside it under the same prefix.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        candidates += [prefix] + sorted(glob.glob(os.path.join(prefix, "cuda*")), reverse=True)
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        has_nvcc = os.path.isfile(os.path.join(home, "bin", "nvcc"))
        has_cudart = any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib"))
        if has_nvcc and has_cudart:
            return home
    return None


def cuda_arch_list() -> str:
    """FASTMASK_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST in torch's "8.0;9.0+PTX" form; "80", "sm_90" accepted."""
    raw = os.environ.get("FASTMASK_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    out = []
    for item in raw.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().removeprefix("sm_").removeprefix("compute_")
        if not item:
            continue
        ptx = item.endswith("+PTX")
        item = item.removesuffix("+PTX")
        if "." not in item and item[:2].isdigit():  # "90" / "90a" -> "9.0" / "9.0a"
            item = f"{item[:-1]}.{item[-1]}" if item.isdigit() else f"{item[:-2]}.{item[-2:]}"
        out.append(item + ("+PTX" if ptx else ""))
    return ";".join(out)


def cuda_extensions() -> tuple[list, dict]:
    """([CUDAExtension], cmdclass) when the extension should be built, else ([], {})."""
    if _flag("FASTMASK_SKIP_CUDA_BUILD"):
        return [], {}
    force = _flag("FASTMASK_BUILD_CUDA")

    def skip(reason: str) -> tuple[list, dict]:
        if force:
            sys.exit(f"fastmask: FASTMASK_BUILD_CUDA=1 but {reason}")
        print(f"fastmask: not building the CUDA extension fastmask._C: {reason}", file=sys.stderr)
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:
        return skip(f"torch is not importable at build time ({e}); use pip's --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")

    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + [os.path.join("csrc", "bindings.cpp")]
    ext = CUDAExtension(
        name="fastmask._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        depends=sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh"))),
        extra_compile_args={
            # -g0 overrides the -g of Python's own CFLAGS: debug info for torch's headers costs a
            # quarter of this file's compile time and is of no use in the bindings' glue code.
            "cxx": ["-O3", "-g0"],
            # -Xptxas=-v: registers, spills and shared memory of every kernel in the build log.
            # No --use_fast_math: the loss's statistics want IEEE division and sqrt.
            "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
