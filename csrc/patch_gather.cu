// patch_gather: fused patchify + gather of the visible patches (forward), and its transpose
// (backward), without materializing all L patches.
//
//   forward : imgs [B, C, H, W], ids_keep [B, K] -> out [B, K, p*p*C], MAE's (p, q, c) order:
//             out[b, k, (i*p + j)*C + c] = imgs[b, c, hi*p + i, wj*p + j], (hi, wj) = divmod(ids_keep[b, k], W/p)
//   backward: grad [B, K, p*p*C] -> grad_imgs [B, C, H, W], written only at kept patches (the caller
//             zero-fills). ids_keep rows hold distinct patches (a prefix of a permutation, as every
//             mask generator makes), so each image element has at most one writer: no atomics.
//
// Layout: an image row segment of a patch is p contiguous elements along W, a token patch row is
// p*C contiguous elements with the channel fastest. The kernel transposes (c, j) through shared
// memory so that both global sides use 16-byte vector accesses when sizes and alignment allow,
// with a scalar path otherwise (e.g. p = 14 in fp32: a 56-byte image run).
#include "common.cuh"
#include "ops.h"

namespace fastmask {
namespace {

// Shared memory one block stages per pass; a 16x16x3 patch needs 3 KiB (fp32), so real patch sizes
// fit in one pass and the budget only bounds exotic ones.
constexpr int kSmemBudget = 12 * 1024;

struct PatchGeom {
  int64_t K;        // kept patches per image
  int C, H, W, p;   // image channels and size, patch size
  int w;            // patches per image row, W / p
};

// Image side of one chunk of `nrows` patch rows starting at patch row i0: C*nrows runs of p
// elements, each moved between global memory (img0 + c*H*W + (i0+ii)*W) and shared memory in token
// order (s[(ii*p + j)*C + c]). V = elements per access (16 bytes or 1).
template <typename T, int V, bool TO_IMAGE>
__device__ __forceinline__ void image_side(T* img0, T* s, const PatchGeom& g, int i0, int nrows) {
  const int64_t plane = static_cast<int64_t>(g.H) * g.W;
  const int vecs_per_run = g.p / V;
  const int total = g.C * nrows * vecs_per_run;
  for (int t = threadIdx.x; t < total; t += blockDim.x) {
    const int run = t / vecs_per_run;
    const int j = (t - run * vecs_per_run) * V;
    const int c = run / nrows, ii = run - c * nrows;
    T* gp = img0 + c * plane + static_cast<int64_t>(i0 + ii) * g.W + j;
    T* sp = s + (ii * g.p + j) * g.C + c;
    if constexpr (!TO_IMAGE) {
      const Pack<T, V> x = load_pack<T, V>(gp);
#pragma unroll
      for (int u = 0; u < V; ++u) sp[u * g.C] = x.v[u];
    } else {
      Pack<T, V> x;
#pragma unroll
      for (int u = 0; u < V; ++u) x.v[u] = sp[u * g.C];
      store_pack<T, V>(gp, x);
    }
  }
}

// Token side of one chunk: n contiguous elements, a straight copy between global and shared memory.
template <typename T, int V, bool TO_IMAGE>
__device__ __forceinline__ void token_side(T* tokc, T* s, int n) {
  for (int t = threadIdx.x * V; t < n; t += blockDim.x * V) {
    if constexpr (!TO_IMAGE) {
      store_pack<T, V>(tokc + t, load_pack<T, V>(s + t));
    } else {
      store_pack<T, V>(s + t, load_pack<T, V>(tokc + t));
    }
  }
}

// One block per kept patch, blockIdx.x = b*K + k. TO_IMAGE=false: image -> smem -> token row
// (forward); TO_IMAGE=true: token row -> smem -> image (backward). Token patch row i depends only
// on image rows (c, i), so the block walks the patch in chunks of `chunk_rows` patch rows and its
// shared memory stays bounded for any patch size.
template <typename T, bool TO_IMAGE>
__global__ void patch_transpose_kernel(T* __restrict__ img, T* __restrict__ tok, const int64_t* __restrict__ ids,
                                       PatchGeom g, int chunk_rows, bool vec_img, bool vec_tok) {
  constexpr int V = kVec16<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s = reinterpret_cast<T*>(smem_raw);

  const int64_t bk = blockIdx.x;
  const int64_t b = bk / g.K;
  const int64_t idx = ids[bk];
  CUDA_KERNEL_ASSERT(idx >= 0 && idx < static_cast<int64_t>(g.H / g.p) * g.w);
  const int hi = static_cast<int>(idx / g.w), wj = static_cast<int>(idx % g.w);
  T* img0 = img + b * g.C * static_cast<int64_t>(g.H) * g.W + static_cast<int64_t>(hi) * g.p * g.W +
            static_cast<int64_t>(wj) * g.p;
  const int row_elems = g.p * g.C;
  T* tok0 = tok + bk * row_elems * g.p;

  for (int i0 = 0; i0 < g.p; i0 += chunk_rows) {
    const int nrows = min(chunk_rows, g.p - i0);
    const int n = nrows * row_elems;
    T* tokc = tok0 + static_cast<int64_t>(i0) * row_elems;
    if constexpr (!TO_IMAGE) {
      if (vec_img) image_side<T, V, false>(img0, s, g, i0, nrows);
      else image_side<T, 1, false>(img0, s, g, i0, nrows);
      __syncthreads();
      if (vec_tok) token_side<T, V, false>(tokc, s, n);
      else token_side<T, 1, false>(tokc, s, n);
    } else {
      if (vec_tok) token_side<T, V, true>(tokc, s, n);
      else token_side<T, 1, true>(tokc, s, n);
      __syncthreads();
      if (vec_img) image_side<T, V, true>(img0, s, g, i0, nrows);
      else image_side<T, 1, true>(img0, s, g, i0, nrows);
    }
    __syncthreads();  // the next chunk overwrites s
  }
}

template <typename T, bool TO_IMAGE>
void launch_patch_transpose(T* img, T* tok, const int64_t* ids, int64_t B, PatchGeom g) {
  if (B * g.K == 0) return;
  constexpr int V = kVec16<T>;
  const int row_elems = g.p * g.C;
  const int row_bytes = row_elems * static_cast<int>(sizeof(T));
  TORCH_CHECK(row_bytes <= 48 * 1024, "fastmask_cuda::patch_gather: one patch row of p*C = ", row_elems,
              " elements exceeds the 48 KiB of shared memory a block stages");
  TORCH_CHECK(B * g.K <= 0x7fffffff, "fastmask_cuda::patch_gather: B*K = ", B * g.K, " patches exceed the grid");
  const int chunk_rows = std::max(1, std::min(g.p, kSmemBudget / row_bytes));
  // Image runs start at multiples of p within rows of W elements: 16-byte aligned when both are
  // multiples of V and the base is. Token chunks start at multiples of p*C.
  const bool vec_img = g.p % V == 0 && g.W % V == 0 && is_aligned16(img);
  const bool vec_tok = row_elems % V == 0 && is_aligned16(tok);
  const int chunk_elems = chunk_rows * row_elems;
  const int accesses = static_cast<int>(ceil_div(chunk_elems, vec_tok ? V : 1));
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(accesses, 32) * 32)));
  const size_t smem = static_cast<size_t>(chunk_elems) * sizeof(T);
  patch_transpose_kernel<T, TO_IMAGE><<<static_cast<unsigned>(B * g.K), threads, smem, current_stream()>>>(
      img, tok, ids, g, chunk_rows, vec_img, vec_tok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PatchGeom geometry(const at::TensorBase& imgs_like, int64_t K, int64_t patch_size) {
  PatchGeom g;
  g.K = K;
  g.C = static_cast<int>(imgs_like.size(1));
  g.H = static_cast<int>(imgs_like.size(2));
  g.W = static_cast<int>(imgs_like.size(3));
  g.p = static_cast<int>(patch_size);
  g.w = g.W / g.p;
  return g;
}

}  // namespace

void patch_gather_fwd_cuda(const at::TensorBase& imgs, const at::TensorBase& ids_keep, int64_t patch_size,
                           const at::TensorBase& out) {
  const PatchGeom g = geometry(imgs, ids_keep.size(1), patch_size);
  FASTMASK_DISPATCH_FLOATING(imgs.scalar_type(), "patch_gather_fwd", [&] {
    launch_patch_transpose<scalar_t, false>(imgs.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                            ids_keep.data_ptr<int64_t>(), imgs.size(0), g);
  });
}

void patch_gather_bwd_cuda(const at::TensorBase& grad, const at::TensorBase& ids_keep, int64_t patch_size,
                           const at::TensorBase& grad_imgs) {
  const PatchGeom g = geometry(grad_imgs, ids_keep.size(1), patch_size);
  FASTMASK_DISPATCH_FLOATING(grad.scalar_type(), "patch_gather_bwd", [&] {
    launch_patch_transpose<scalar_t, true>(grad_imgs.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                           ids_keep.data_ptr<int64_t>(), grad_imgs.size(0), g);
  });
}

}  // namespace fastmask
