// norm_pix_loss: MAE's normalized-pixel reconstruction loss, fused, forward and backward.
//
//   forward : pred [B, L, D = p*p*C], imgs [B, C, H, W], mask [B, L] fp32 (1 = hidden) -> loss [] fp32
//             t      = patchify(imgs)[b, l]                          (MAE (p, q, c) order)
//             t_hat  = (t - mean(t)) / sqrt(var_unbiased(t) + eps)   (t itself when norm_pix is false)
//             loss   = sum_{b,l} mask[b,l] * mean_d (pred - t_hat)^2  /  sum_{b,l} mask[b,l]
//   backward: d loss / d pred[b, l, d] = grad * mask[b,l] / sum(mask) * 2/D * (pred - t_hat)
//             (imgs and mask get no gradient: the target is data.)
//
// One warp per patch. The warp stages its target patch in shared memory as fp32, already in token
// order (16-byte loads of the image runs when the layout allows), so the pred row is then read
// with 16-byte loads and paired element by element; mean and variance are two exact passes over
// the staged patch (no E[x^2] - E[x]^2 cancellation). The normalized target is never written to
// global memory. Patches with mask 0 read nothing: their loss term is 0 and their gradient is a
// zero row. Statistics and sums are fp32 whatever the input dtype; the forward's final sum is a
// fixed-order two-stage reduction (per-block partials, then one block), so it is deterministic.
// The backward recomputes the statistics instead of saving them: it has to read the target anyway.
#include <ATen/cuda/EmptyTensor.h>

#include "common.cuh"
#include "ops.h"

namespace fastmask {
namespace {

constexpr int kMaxWarpsPerBlock = 8;
constexpr int kFinalizeThreads = 1024;

struct NpGeom {
  int64_t n_patches;  // B * L
  int64_t L;
  int C, H, W, p, w;  // image channels and size, patch size, patches per image row
  int D;              // p * p * C
};

// Copy one image patch into s (fp32, token order s[(i*p + j)*C + c]); returns this lane's sum.
template <typename TI, int V>
__device__ __forceinline__ float stage_target(const TI* __restrict__ img0, float* s, const NpGeom& g) {
  const int lane = threadIdx.x & 31;
  const int64_t plane = static_cast<int64_t>(g.H) * g.W;
  const int vecs_per_run = g.p / V;
  const int total = g.C * g.p * vecs_per_run;
  float sum = 0.f;
  for (int t = lane; t < total; t += 32) {
    const int run = t / vecs_per_run;
    const int j = (t - run * vecs_per_run) * V;
    const int c = run / g.p, i = run - c * g.p;
    const Pack<TI, V> x = load_pack<TI, V>(img0 + c * plane + static_cast<int64_t>(i) * g.W + j);
    float* sp = s + (i * g.p + j) * g.C + c;
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const float f = to_float(x.v[u]);
      sp[u * g.C] = f;
      sum += f;
    }
  }
  return sum;
}

// Stage the target of `patch` and return its normalization (mean, rstd); (0, 1) without norm_pix.
template <typename TI>
__device__ __forceinline__ void target_stats(const TI* __restrict__ imgs, float* s, const NpGeom& g, int64_t patch,
                                             float eps, bool norm_pix, bool vec_img, float& mean, float& rstd) {
  const int lane = threadIdx.x & 31;
  const int64_t b = patch / g.L, l = patch - b * g.L;
  const int hi = static_cast<int>(l / g.w), wj = static_cast<int>(l % g.w);
  const TI* img0 = imgs + b * g.C * static_cast<int64_t>(g.H) * g.W + static_cast<int64_t>(hi) * g.p * g.W +
                   static_cast<int64_t>(wj) * g.p;
  const float sum = vec_img ? stage_target<TI, kVec16<TI>>(img0, s, g) : stage_target<TI, 1>(img0, s, g);
  __syncwarp();  // s written by other lanes is read below
  mean = 0.f;
  rstd = 1.f;
  if (norm_pix) {
    mean = warp_sum(sum) / g.D;
    float sq = 0.f;
    for (int e = lane; e < g.D; e += 32) {
      const float d = s[e] - mean;
      sq += d * d;
    }
    // Unbiased variance and eps inside the root, as MAE's forward_loss.
    const float var = warp_sum(sq) / (g.D - 1);
    rstd = rsqrtf(var + eps);
  }
}

// Four staged target values at s[e..e+3] (e a multiple of 4 in the vector path: one 16-byte
// shared load, conflict-free across the warp), else one at a time.
template <int V>
__device__ __forceinline__ void load_targets(const float* s, int e, float (&t)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int u = 0; u < V; u += 4) {
      const Pack<float, 4> x = load_pack<float, 4>(s + e + u);
#pragma unroll
      for (int k = 0; k < 4; ++k) t[u + k] = x.v[k];
    }
  } else {
#pragma unroll
    for (int u = 0; u < V; ++u) t[u] = s[e + u];
  }
}

template <typename T, int V>
__device__ __forceinline__ float patch_sq_err(const T* __restrict__ prow, const float* s, int D, float mean,
                                              float rstd) {
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
  for (int e = lane * V; e < D; e += 32 * V) {
    const Pack<T, V> x = load_pack<T, V>(prow + e);
    float t[V];
    load_targets<V>(s, e, t);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const float d = to_float(x.v[u]) - (t[u] - mean) * rstd;
      acc += d * d;
    }
  }
  return acc;
}

template <typename T, int V>
__device__ __forceinline__ void patch_grad(const T* __restrict__ prow, T* __restrict__ grow, const float* s, int D,
                                           float mean, float rstd, float scale) {
  const int lane = threadIdx.x & 31;
  for (int e = lane * V; e < D; e += 32 * V) {
    const Pack<T, V> x = load_pack<T, V>(prow + e);
    float t[V];
    load_targets<V>(s, e, t);
    Pack<T, V> y;
#pragma unroll
    for (int u = 0; u < V; ++u) y.v[u] = from_float<T>(scale * (to_float(x.v[u]) - (t[u] - mean) * rstd));
    store_pack<T, V>(grow + e, y);
  }
}

template <typename T, int V>
__device__ __forceinline__ void zero_row(T* __restrict__ grow, int D) {
  Pack<T, V> z;
#pragma unroll
  for (int u = 0; u < V; ++u) z.v[u] = from_float<T>(0.f);
  for (int e = (threadIdx.x & 31) * V; e < D; e += 32 * V) store_pack<T, V>(grow + e, z);
}

// One warp per patch; block_loss[blockIdx.x] = sum over the block's patches of mask * patch loss.
template <typename T, typename TI>
__global__ void norm_pix_loss_fwd_kernel(const T* __restrict__ pred, const TI* __restrict__ imgs,
                                         const float* __restrict__ mask, float* __restrict__ block_loss, NpGeom g,
                                         float eps, bool norm_pix, bool vec_img, bool vec_pred) {
  extern __shared__ __align__(16) float smem[];
  __shared__ float warp_loss[kMaxWarpsPerBlock];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  float* s = smem + static_cast<int64_t>(warp) * g.D;
  const int64_t patch = static_cast<int64_t>(blockIdx.x) * nwarps + warp;
  float contrib = 0.f;
  if (patch < g.n_patches) {
    const float m = mask[patch];
    if (m != 0.f) {  // warp-uniform: one patch per warp
      float mean, rstd;
      target_stats<TI>(imgs, s, g, patch, eps, norm_pix, vec_img, mean, rstd);
      const T* prow = pred + patch * g.D;
      const float err = vec_pred ? patch_sq_err<T, kVec16<T>>(prow, s, g.D, mean, rstd)
                                 : patch_sq_err<T, 1>(prow, s, g.D, mean, rstd);
      contrib = m * (warp_sum(err) / g.D);
    }
  }
  if (lane == 0) warp_loss[warp] = contrib;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < nwarps; ++w) total += warp_loss[w];
    block_loss[blockIdx.x] = total;
  }
}

// One block: loss = sum(block_loss) / sum(mask).
__global__ void norm_pix_loss_finalize_kernel(const float* __restrict__ block_loss, int64_t nblocks,
                                              const float* __restrict__ mask, int64_t n_patches,
                                              float* __restrict__ loss) {
  float l = 0.f, m = 0.f;
  for (int64_t i = threadIdx.x; i < nblocks; i += blockDim.x) l += block_loss[i];
  for (int64_t i = threadIdx.x; i < n_patches; i += blockDim.x) m += mask[i];
  l = block_sum(l);
  m = block_sum(m);
  if (threadIdx.x == 0) loss[0] = l / m;
}

// One block: out = sum(mask), the loss denominator the backward needs.
__global__ void mask_sum_kernel(const float* __restrict__ mask, int64_t n_patches, float* __restrict__ out) {
  float m = 0.f;
  for (int64_t i = threadIdx.x; i < n_patches; i += blockDim.x) m += mask[i];
  m = block_sum(m);
  if (threadIdx.x == 0) out[0] = m;
}

// One warp per patch, writes the whole grad row (zeros where mask is 0).
template <typename T, typename TI>
__global__ void norm_pix_loss_bwd_kernel(const float* __restrict__ grad_loss, const float* __restrict__ mask_sum,
                                         const T* __restrict__ pred, const TI* __restrict__ imgs,
                                         const float* __restrict__ mask, T* __restrict__ grad_pred, NpGeom g,
                                         float eps, bool norm_pix, bool vec_img, bool vec_pred) {
  extern __shared__ __align__(16) float smem[];
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  float* s = smem + static_cast<int64_t>(warp) * g.D;
  const int64_t patch = static_cast<int64_t>(blockIdx.x) * nwarps + warp;
  if (patch >= g.n_patches) return;  // no block-wide barrier below
  const float m = mask[patch];
  T* grow = grad_pred + patch * g.D;
  if (m == 0.f) {
    if (vec_pred) zero_row<T, kVec16<T>>(grow, g.D);
    else zero_row<T, 1>(grow, g.D);
    return;
  }
  float mean, rstd;
  target_stats<TI>(imgs, s, g, patch, eps, norm_pix, vec_img, mean, rstd);
  const float scale = grad_loss[0] * m / mask_sum[0] * (2.f / g.D);
  const T* prow = pred + patch * g.D;
  if (vec_pred) patch_grad<T, kVec16<T>>(prow, grow, s, g.D, mean, rstd, scale);
  else patch_grad<T, 1>(prow, grow, s, g.D, mean, rstd, scale);
}

NpGeom geometry(const at::TensorBase& pred, const at::TensorBase& imgs, int64_t patch_size) {
  NpGeom g;
  g.n_patches = pred.size(0) * pred.size(1);
  g.L = pred.size(1);
  g.C = static_cast<int>(imgs.size(1));
  g.H = static_cast<int>(imgs.size(2));
  g.W = static_cast<int>(imgs.size(3));
  g.p = static_cast<int>(patch_size);
  g.w = g.W / g.p;
  g.D = static_cast<int>(pred.size(2));
  return g;
}

struct LaunchShape {
  int warps;       // patches per block
  int64_t blocks;
  size_t smem;     // bytes: one fp32 patch per warp
};

LaunchShape launch_shape(const NpGeom& g) {
  TORCH_CHECK(g.D <= kNormPixMaxPatchElems, "fastmask_cuda::norm_pix_loss: patch vector of ", g.D,
              " elements exceeds the ", kNormPixMaxPatchElems, " one warp stages in shared memory");
  LaunchShape ls;
  const size_t patch_bytes = sizeof(float) * g.D;
  ls.warps = static_cast<int>(std::min<size_t>(kMaxWarpsPerBlock, kNormPixSmemBytes / patch_bytes));
  ls.blocks = ceil_div(g.n_patches, ls.warps);
  TORCH_CHECK(ls.blocks <= 0x7fffffff, "fastmask_cuda::norm_pix_loss: too many patches (", g.n_patches, ")");
  ls.smem = sizeof(float) * g.D * ls.warps;
  return ls;
}

template <typename T, typename TI>
bool img_vectorizable(const NpGeom& g, const TI* imgs) {
  return g.p % kVec16<TI> == 0 && g.W % kVec16<TI> == 0 && is_aligned16(imgs);
}

template <typename T, typename TI>
void launch_fwd(const T* pred, const TI* imgs, const float* mask, float* loss, const NpGeom& g, bool norm_pix,
                float* block_loss, const LaunchShape& ls) {
  const bool vec_pred = g.D % kVec16<T> == 0 && is_aligned16(pred);
  norm_pix_loss_fwd_kernel<T, TI><<<static_cast<unsigned>(ls.blocks), 32 * ls.warps, ls.smem, current_stream()>>>(
      pred, imgs, mask, block_loss, g, 1e-6f, norm_pix, img_vectorizable<T, TI>(g, imgs), vec_pred);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  norm_pix_loss_finalize_kernel<<<1, kFinalizeThreads, 0, current_stream()>>>(block_loss, ls.blocks, mask,
                                                                              g.n_patches, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename TI>
void launch_bwd(const float* grad_loss, const T* pred, const TI* imgs, const float* mask, T* grad_pred,
                const NpGeom& g, bool norm_pix, float* mask_sum, const LaunchShape& ls) {
  mask_sum_kernel<<<1, kFinalizeThreads, 0, current_stream()>>>(mask, g.n_patches, mask_sum);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool vec_pred = g.D % kVec16<T> == 0 && is_aligned16(pred) && is_aligned16(grad_pred);
  norm_pix_loss_bwd_kernel<T, TI><<<static_cast<unsigned>(ls.blocks), 32 * ls.warps, ls.smem, current_stream()>>>(
      grad_loss, mask_sum, pred, imgs, mask, grad_pred, g, 1e-6f, norm_pix, img_vectorizable<T, TI>(g, imgs),
      vec_pred);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void norm_pix_loss_fwd_cuda(const at::TensorBase& pred, const at::TensorBase& imgs, const at::TensorBase& mask,
                            int64_t patch_size, bool norm_pix, const at::TensorBase& loss) {
  const NpGeom g = geometry(pred, imgs, patch_size);
  if (g.n_patches == 0 || g.D == 0) {  // empty mean, as torch: 0 / 0
    C10_CUDA_CHECK(cudaMemsetAsync(loss.data_ptr<float>(), 0xff, sizeof(float), current_stream()));  // NaN
    return;
  }
  const LaunchShape ls = launch_shape(g);
  at::TensorBase block_loss = at::detail::empty_cuda({ls.blocks}, at::kFloat, pred.device(), std::nullopt);
  FASTMASK_DISPATCH_FLOATING(pred.scalar_type(), "norm_pix_loss_fwd", [&] {
    const scalar_t* p = pred.data_ptr<scalar_t>();
    if (imgs.scalar_type() == pred.scalar_type())
      launch_fwd<scalar_t, scalar_t>(p, imgs.data_ptr<scalar_t>(), mask.data_ptr<float>(), loss.data_ptr<float>(),
                                     g, norm_pix, block_loss.data_ptr<float>(), ls);
    else
      launch_fwd<scalar_t, float>(p, imgs.data_ptr<float>(), mask.data_ptr<float>(), loss.data_ptr<float>(), g,
                                  norm_pix, block_loss.data_ptr<float>(), ls);
  });
}

void norm_pix_loss_bwd_cuda(const at::TensorBase& grad_loss, const at::TensorBase& pred, const at::TensorBase& imgs,
                            const at::TensorBase& mask, int64_t patch_size, bool norm_pix,
                            const at::TensorBase& grad_pred) {
  const NpGeom g = geometry(pred, imgs, patch_size);
  if (g.n_patches == 0 || g.D == 0) return;
  const LaunchShape ls = launch_shape(g);
  at::TensorBase mask_sum = at::detail::empty_cuda({1}, at::kFloat, pred.device(), std::nullopt);
  FASTMASK_DISPATCH_FLOATING(pred.scalar_type(), "norm_pix_loss_bwd", [&] {
    const scalar_t* p = pred.data_ptr<scalar_t>();
    scalar_t* gp = grad_pred.data_ptr<scalar_t>();
    if (imgs.scalar_type() == pred.scalar_type())
      launch_bwd<scalar_t, scalar_t>(grad_loss.data_ptr<float>(), p, imgs.data_ptr<scalar_t>(),
                                     mask.data_ptr<float>(), gp, g, norm_pix, mask_sum.data_ptr<float>(), ls);
    else
      launch_bwd<scalar_t, float>(grad_loss.data_ptr<float>(), p, imgs.data_ptr<float>(), mask.data_ptr<float>(),
                                  gp, g, norm_pix, mask_sum.data_ptr<float>(), ls);
  });
}

}  // namespace fastmask
