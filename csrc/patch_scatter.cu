// patch_scatter: MAE's decoder unshuffle (forward) and its gradient (backward).
//
//   forward : tokens [B, K, D], ids_restore [B, L], mask_token [D] -> out [B, L, D]
//             out[b, l] = tokens[b, r] if r = ids_restore[b, l] < K else mask_token
//   backward: grad [B, L, D] -> grad_tokens [B, K, D]: grad_tokens[b, r] = grad[b, l] for r < K
//             (ids_restore is a permutation of 0..L-1, as MAE's argsort makes, so every visible
//             token gets exactly one row: no zero-fill, no atomics);
//             grad_mask_token [D] fp32 = sum of grad[b, l] over hidden rows (r >= K).
//
// Rows are D contiguous elements, moved as 16-byte packs when D and the pointers allow, else as
// scalars. The backward reads each gradient row once: visible rows are copied, hidden rows are
// accumulated in fp32 registers, and the mask-token sum is finished by a second, fixed-order
// reduction over per-chunk partials, so the result is deterministic.
#include <ATen/cuda/EmptyTensor.h>

#include "common.cuh"
#include "ops.h"

namespace fastmask {
namespace {

// Rows one backward block reduces into one partial sum: enough work per thread (16 rows with 8 row
// lanes) and few enough partials that the second pass is negligible. Fixed, so the summation
// order, hence the bits of grad_mask_token, do not depend on the GPU.
constexpr int kRowsPerChunk = 128;
constexpr int kRowLanes = 8;  // blockDim.y of the backward kernel

// One thread per V-element pack of the output, grid-stride.
template <typename T, int V>
__global__ void patch_scatter_fwd_kernel(const T* __restrict__ tokens, const int64_t* __restrict__ ids_restore,
                                         const T* __restrict__ mask_token, T* __restrict__ out, int64_t rows,
                                         int64_t L, int64_t K, int64_t packs_per_row) {
  const int64_t total = rows * packs_per_row;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = g / packs_per_row;
    const int64_t col = (g - row * packs_per_row) * V;
    const int64_t r = ids_restore[row];
    CUDA_KERNEL_ASSERT(r >= 0 && r < L);
    const T* src = r < K ? tokens + ((row / L) * K + r) * packs_per_row * V + col : mask_token + col;
    store_pack<T, V>(out + g * V, load_pack<T, V>(src));
  }
}

// blockDim = (32, kRowLanes); grid = (ceil(packs_per_row / 32), ceil(rows / kRowsPerChunk)).
// Lane x owns one pack column, lane y strides over the chunk's rows. partial [chunks, D] fp32.
template <typename T, int V>
__global__ void patch_scatter_bwd_kernel(const T* __restrict__ grad, const int64_t* __restrict__ ids_restore,
                                         T* __restrict__ grad_tokens, float* __restrict__ partial, int64_t rows,
                                         int64_t L, int64_t K, int64_t packs_per_row) {
  __shared__ float red[kRowLanes][32 * V];
  const int64_t D = packs_per_row * V;
  const int64_t pack = blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t r1 = min(rows, r0 + kRowsPerChunk);
  float acc[V];
#pragma unroll
  for (int u = 0; u < V; ++u) acc[u] = 0.f;
  if (pack < packs_per_row) {
    for (int64_t row = r0 + threadIdx.y; row < r1; row += kRowLanes) {
      const int64_t r = ids_restore[row];
      CUDA_KERNEL_ASSERT(r >= 0 && r < L);
      const Pack<T, V> x = load_pack<T, V>(grad + row * D + pack * V);
      if (r < K) {
        store_pack<T, V>(grad_tokens + ((row / L) * K + r) * D + pack * V, x);
      } else {
#pragma unroll
        for (int u = 0; u < V; ++u) acc[u] += to_float(x.v[u]);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < V; ++u) red[threadIdx.y][threadIdx.x * V + u] = acc[u];
  __syncthreads();
  if (threadIdx.y == 0 && pack < packs_per_row) {
#pragma unroll
    for (int u = 0; u < V; ++u) {
      float s = 0.f;
#pragma unroll
      for (int y = 0; y < kRowLanes; ++y) s += red[y][threadIdx.x * V + u];
      partial[blockIdx.y * D + pack * V + u] = s;
    }
  }
}

// out[d] = sum over chunks of partial[chunk, d], in chunk order.
__global__ void sum_partials_kernel(const float* __restrict__ partial, float* __restrict__ out, int64_t chunks,
                                    int64_t D) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * D + d];
  out[d] = s;
}

template <typename T>
bool rows_vectorizable(int64_t D, std::initializer_list<const void*> ptrs) {
  if (D % kVec16<T> != 0) return false;
  for (const void* p : ptrs)
    if (!is_aligned16(p)) return false;
  return true;
}

template <typename T, int V>
void launch_fwd(const T* tokens, const int64_t* ids, const T* mask_token, T* out, int64_t rows, int64_t L, int64_t K,
                int64_t D) {
  const int64_t packs = rows * (D / V);
  const int threads = 256;
  // Grid-stride: cap the grid, each thread then handles several packs.
  const int64_t blocks = std::min<int64_t>(ceil_div(packs, threads), 65535);
  patch_scatter_fwd_kernel<T, V><<<static_cast<unsigned>(blocks), threads, 0, current_stream()>>>(
      tokens, ids, mask_token, out, rows, L, K, D / V);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V>
void launch_bwd(const T* grad, const int64_t* ids, T* grad_tokens, float* partial, int64_t rows, int64_t L,
                int64_t K, int64_t D, int64_t chunks) {
  const dim3 block(32, kRowLanes);
  const dim3 grid(static_cast<unsigned>(ceil_div(D / V, 32)), static_cast<unsigned>(chunks));
  patch_scatter_bwd_kernel<T, V><<<grid, block, 0, current_stream()>>>(grad, ids, grad_tokens, partial, rows, L, K,
                                                                         D / V);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void patch_scatter_fwd_cuda(const at::TensorBase& tokens, const at::TensorBase& ids_restore,
                            const at::TensorBase& mask_token, const at::TensorBase& out) {
  const int64_t B = tokens.size(0), K = tokens.size(1), D = tokens.size(2), L = ids_restore.size(1);
  if (B * L * D == 0) return;
  FASTMASK_DISPATCH_FLOATING(tokens.scalar_type(), "patch_scatter_fwd", [&] {
    const scalar_t* t = tokens.data_ptr<scalar_t>();
    const scalar_t* m = mask_token.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t* ids = ids_restore.data_ptr<int64_t>();
    if (rows_vectorizable<scalar_t>(D, {t, m, o}))
      launch_fwd<scalar_t, kVec16<scalar_t>>(t, ids, m, o, B * L, L, K, D);
    else
      launch_fwd<scalar_t, 1>(t, ids, m, o, B * L, L, K, D);
  });
}

void patch_scatter_bwd_cuda(const at::TensorBase& grad, const at::TensorBase& ids_restore,
                            const at::TensorBase& grad_tokens, const at::TensorBase& grad_mask_token) {
  const int64_t B = grad.size(0), L = grad.size(1), D = grad.size(2), K = grad_tokens.size(1);
  float* gm = grad_mask_token.data_ptr<float>();
  if (D == 0) return;
  if (B * L == 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(gm, 0, D * sizeof(float), current_stream()));
    return;
  }
  const int64_t chunks = ceil_div(B * L, kRowsPerChunk);
  TORCH_CHECK(chunks <= 65535, "fastmask_cuda::patch_scatter_bwd: B*L = ", B * L, " rows exceed the ",
              65535 * kRowsPerChunk, " this kernel's grid covers");
  // The per-chunk partials live in the caching allocator for the duration of the two launches.
  at::TensorBase partial = at::detail::empty_cuda({chunks, D}, at::kFloat, grad.device(), std::nullopt);
  FASTMASK_DISPATCH_FLOATING(grad.scalar_type(), "patch_scatter_bwd", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gt = grad_tokens.data_ptr<scalar_t>();
    const int64_t* ids = ids_restore.data_ptr<int64_t>();
    float* part = partial.data_ptr<float>();
    if (rows_vectorizable<scalar_t>(D, {g, gt}))
      launch_bwd<scalar_t, kVec16<scalar_t>>(g, ids, gt, part, B * L, L, K, D, chunks);
    else
      launch_bwd<scalar_t, 1>(g, ids, gt, part, B * L, L, K, D, chunks);
  });
  sum_partials_kernel<<<static_cast<unsigned>(ceil_div(D, 256)), 256, 0, current_stream()>>>(
      partial.data_ptr<float>(), gm, chunks, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastmask
