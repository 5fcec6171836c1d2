#!/usr/bin/env bash
# Compile every Triton kernel (kernels/) as its launcher launches it and print registers, spills and
# shared memory per kernel (python -m fastmask.kernels._compile_check); then compile and link the CUDA
# extension fastmask._C (csrc/) on a machine without a GPU, through the same setup.py a user runs, into a
# build folder outside the source tree; print the ptxas resource report (registers, spills, shared memory
# per kernel); check the .so links and registers its ops. Both for the same architectures.
#
# Needs: a CUDA toolkit (nvcc 13.x, the major version of torch.version.cuda); a CUDA build of torch
# (torch 2.14.1+cu130 from PyPI, which also brings the nvidia/cu13 headers and libraries); g++, ninja,
# binutils (nm, readelf, c++filt); fastmask installed in $PYTHON's environment (for the trace tests).
#
# Usage: .ci/build_csrc.sh [BUILD_DIR]       (default: $TMPDIR/fastmask-csrc-build)
#   ARCHS="9.0"        architectures (default "9.0;8.0")
#   PYTHON=...         interpreter with torch (default: python on PATH)
#   MAX_JOBS=N         parallel compile jobs (default: number of cores)
#   REUSE_BUILD=1      skip the compile and re-run the checks on BUILD_DIR's previous build
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-${TMPDIR:-/tmp}/fastmask-csrc-build}"
ARCHS="${ARCHS:-9.0;8.0}"
PYTHON="${PYTHON:-python}"
command -v ninja >/dev/null || "$PYTHON" -c "import ninja" 2>/dev/null || echo "build_csrc: no ninja: setuptools compiles one file at a time" >&2
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

die() { echo "build_csrc: $*" >&2; exit 1; }
case "$(realpath -m "$BUILD")/" in "$ROOT"/*) die "build folder $BUILD is inside the source tree $ROOT";; esac

# --- toolkit: CUDA_HOME, else the folder beside the nvcc on PATH (which may be a wrapper script) ---
find_cuda_home() {
  if [[ -n "${CUDA_HOME:-}" ]]; then echo "$CUDA_HOME"; return; fi
  local nvcc prefix cand
  nvcc="$(command -v nvcc || true)"
  local cands=()
  if [[ -n "$nvcc" ]]; then
    prefix="$(dirname "$(dirname "$(realpath "$nvcc")")")"
    cands+=("$prefix")
    for cand in $(ls -d "$prefix"/cuda* 2>/dev/null | sort -r); do cands+=("$cand"); done
  fi
  cands+=(/usr/local/cuda)
  for cand in $(ls -d /usr/local/cuda-* 2>/dev/null | sort -r); do cands+=("$cand"); done
  for cand in "${cands[@]}"; do
    if [[ -x "$cand/bin/nvcc" ]] && { [[ -e "$cand/lib64/libcudart.so" ]] || [[ -e "$cand/lib/libcudart.so" ]]; }; then
      echo "$cand"; return
    fi
  done
}
CUDA_HOME="$(find_cuda_home)"
[[ -n "$CUDA_HOME" ]] || die "no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$CUDA_HOME/lib64:$CUDA_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"

# --- torch: must be a CUDA build; its nvidia-* wheels hold the CUDA headers torch's own headers use ---
read -r TORCH_VERSION TORCH_CUDA SITE TORCH_LIB < <("$PYTHON" - <<'EOF'
import os, sysconfig, torch
print(torch.__version__, torch.version.cuda, sysconfig.get_paths()["purelib"], os.path.join(os.path.dirname(torch.__file__), "lib"))
EOF
) || die "$PYTHON cannot import torch"
[[ "$TORCH_CUDA" != "None" ]] || die "torch $TORCH_VERSION is not a CUDA build (the CPU wheel lacks c10/cuda headers)"
NV_INCLUDE="$(ls -d "$SITE"/nvidia/cu*/include 2>/dev/null | head -1 || true)"
NV_LIB="$(ls -d "$SITE"/nvidia/cu*/lib 2>/dev/null | head -1 || true)"
if [[ -n "$NV_INCLUDE" ]]; then export CPATH="$NV_INCLUDE${CPATH:+:$CPATH}"; fi
NVCC_VERSION="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
echo "build_csrc: torch $TORCH_VERSION (CUDA $TORCH_CUDA), nvcc $NVCC_VERSION at $CUDA_HOME, archs $ARCHS, $MAX_JOBS jobs"
echo "build_csrc: CPATH=${CPATH:-} LIBRARY_PATH=$LIBRARY_PATH"

# --- Triton kernels: no CUDA toolkit needed (triton ships ptxas); must not run in the interpreter ---
TRITON_ARCHS=""
for arch in ${ARCHS//;/ }; do sm="${arch%+PTX}"; TRITON_ARCHS+="${sm//./} "; done
echo "build_csrc: Triton kernels for sm ${TRITON_ARCHS}(registers, spills, shared memory per kernel and case):"
(cd "$ROOT" && env -u TRITON_INTERPRET "$PYTHON" -m fastmask.kernels._compile_check --arch $TRITON_ARCHS) \
  || die "a Triton kernel failed to compile for a GPU"

# --- build through setup.py, outside the source tree ---
LOG="$BUILD/build.log"
start=$(date +%s)
if [[ "${REUSE_BUILD:-0}" == 1 && -f "$LOG" ]]; then
  echo "build_csrc: REUSE_BUILD=1: checking the existing build in $BUILD"
else
  rm -rf "$BUILD"
  mkdir -p "$BUILD"
  (cd "$ROOT" && FASTMASK_BUILD_CUDA=1 FASTMASK_CUDA_ARCHS="$ARCHS" \
    "$PYTHON" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/temp") >"$LOG" 2>&1 \
    || { tail -n 80 "$LOG"; die "compile failed (full log: $LOG)"; }
fi
elapsed=$(( $(date +%s) - start ))
grep -E "(error|warning)" "$LOG" | grep -v -E "^ptxas info|Warning: .*deprecated" | head -20 || true

# --- ptxas resource report: one line per kernel and architecture ---
echo "build_csrc: ptxas resource report (registers, spills, static smem per kernel):"
"$PYTHON" - "$LOG" <<'EOF'
import re, subprocess, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
rows, cur = [], None
for ln in lines:
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", ln)
    if m:
        cur = {"mangled": m.group(1), "arch": m.group(2), "spill": "?", "regs": "?", "smem": "0"}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ln)
    if m:
        cur["spill"] = f"{m.group(1)}/{m.group(2)}"
    m = re.search(r"Used (\d+) registers", ln)
    if m:
        cur["regs"] = m.group(1)
        s = re.search(r"(\d+) bytes smem", ln)
        cur["smem"] = s.group(1) if s else "0"
names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                       text=True).stdout.splitlines() if rows else []
for r, n in zip(rows, names):
    n = re.sub(r"\(anonymous namespace\)::|fastmask::|c10::", "", n)
    n = re.sub(r"\(.*\)$", "", n)  # drop the parameter list, keep the template arguments
    r["name"] = n
print(f"  {'arch':6} {'regs':>4} {'spill st/ld':>11} {'smem':>5}  kernel")
for r in sorted(rows, key=lambda r: (r["name"], r["arch"])):
    print(f"  {r['arch']:6} {r['regs']:>4} {r['spill']:>11} {r['smem']:>5}  {r['name']}")
spills = [r for r in rows if r["spill"] not in ("0/0", "?")]
print(f"  {len(rows)} kernel builds, {len(spills)} with spills")
if not rows:
    sys.exit("build_csrc: no ptxas report in the build log (was -Xptxas=-v dropped?)")
EOF

# --- link checks ---
SO="$(ls "$BUILD"/lib/fastmask/_C*.so 2>/dev/null | head -1 || true)"
[[ -n "$SO" ]] || die "no fastmask/_C*.so under $BUILD/lib"
echo "build_csrc: built $(basename "$SO") ($(du -h "$SO" | cut -f1)) in ${elapsed}s"
# Whole outputs into variables first: `producer | grep -q` fails under pipefail when grep exits early.
symbols="$(nm -D --defined-only "$SO")"
grep -q " PyInit__C$" <<<"$symbols" || die "$SO does not export PyInit__C"
sections="$(readelf -S "$SO")"
grep -q "\.nv_fatbin" <<<"$sections" || die "$SO has no .nv_fatbin section (no device code)"
for arch in ${ARCHS//;/ }; do  # every .cu compiled for every asked architecture
  sm="${arch%+PTX}"; sm="${sm//./}"
  n="$(grep -c -- "-gencode=arch=compute_$sm,code=sm_$sm" "$LOG" || true)"
  [[ "$n" -ge 3 ]] || die "only $n of the 3 .cu files were compiled for sm_$sm"
done
missing="$(LD_LIBRARY_PATH="$TORCH_LIB:${NV_LIB:+$NV_LIB:}$CUDA_HOME/lib64:$CUDA_HOME/lib" ldd "$SO" | grep "not found" || true)"
[[ -z "$missing" ]] || die "unresolved libraries: $missing"
# Import the fresh build as fastmask._C (a GPU is not needed to load it), then run the tests that
# need only the extension: fake impls + autograd traced through fake tensors, the record's reasons.
(cd "$ROOT" && "$PYTHON" - "$SO" <<'EOF'
import importlib.machinery, importlib.util, sys
import torch
path = sys.argv[1]
loader = importlib.machinery.ExtensionFileLoader("fastmask._C", path)
spec = importlib.util.spec_from_file_location("fastmask._C", path, loader=loader)
mod = importlib.util.module_from_spec(spec)
loader.exec_module(mod)
sys.modules["fastmask._C"] = mod  # fastmask.ops.cuda_backend's `import fastmask._C` finds this build
ops = ["patch_gather_fwd", "patch_gather_bwd", "patch_scatter_fwd", "patch_scatter_bwd",
       "norm_pix_loss_fwd", "norm_pix_loss_bwd"]
for name in ops:
    print(f"  {getattr(torch.ops.fastmask_cuda, name).default._schema}")
# The ops have CUDA kernels only: a CPU call must be refused by the dispatcher, not crash.
try:
    torch.ops.fastmask_cuda.patch_gather_fwd(torch.randn(1, 3, 4, 4), torch.zeros(1, 1, dtype=torch.long), 2)
except (NotImplementedError, RuntimeError) as e:
    assert "CPU" in str(e), e
else:
    sys.exit("build_csrc: a CPU call to fastmask_cuda::patch_gather_fwd did not raise")
print(f"build_csrc: imported {path} with torch {torch.__version__}; {len(ops)} ops registered; "
      f"CUDA available: {torch.cuda.is_available()}")
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_cuda_ops.py", "-k",
                      "fake_trace or record_says_why"]))
EOF
) || die "the built extension failed its import or trace checks"
echo "build_csrc: OK (${elapsed}s compile+link for $ARCHS)"
