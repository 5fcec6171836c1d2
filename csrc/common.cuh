// Device helpers shared by the fastmask CUDA kernels: aligned vector packs, fp32 conversions,
// warp and block sums, and the dtype dispatch used by every launcher.
//
// Only light headers are included on purpose: every .cu file is parsed once for the host and once
// per GPU architecture, and torch's umbrella headers (<torch/extension.h>, <ATen/ATen.h>) would
// multiply the build time several times over. Tensors cross into this code as at::TensorBase.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

// fp32, fp16, bf16 only: fp64 is served by the reference backend, and each extra dtype would add
// its kernels to every architecture's compile.
#define FASTMASK_DISPATCH_FLOATING(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace fastmask {

// V elements of T, aligned to their size, so a dereference compiles to one vector load/store
// (ld.global.v4.b32 for 16 bytes), the same idiom as PyTorch's aligned_vector.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Elements of T in 16 bytes: 4 for fp32, 8 for fp16/bf16.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& x) {
  *reinterpret_cast<Pack<T, V>*>(p) = x;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the whole block, result valid in every thread. Fixed reduction tree, so the result
// does not depend on scheduling (deterministic). blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  v = lane < nwarps ? warp_totals[lane] : 0.f;
  return warp_sum(v);
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace fastmask
