// Launchers implemented in the .cu files, called by bindings.cpp after it validated the inputs and
// allocated the outputs. Every tensor is contiguous, on the current CUDA device, and of the dtypes
// the binding checked; index tensors are int64.
#pragma once

#include <ATen/core/TensorBase.h>

namespace fastmask {

// imgs [B, C, H, W] -> out [B, K, p*p*C] (MAE (p, q, c) order), patches ids_keep [B, K].
void patch_gather_fwd_cuda(const at::TensorBase& imgs, const at::TensorBase& ids_keep, int64_t patch_size,
                           const at::TensorBase& out);
// grad [B, K, p*p*C] -> grad_imgs [B, C, H, W]; grad_imgs must be zero-filled by the caller.
void patch_gather_bwd_cuda(const at::TensorBase& grad, const at::TensorBase& ids_keep, int64_t patch_size,
                           const at::TensorBase& grad_imgs);

// tokens [B, K, D], ids_restore [B, L], mask_token [D] -> out [B, L, D].
void patch_scatter_fwd_cuda(const at::TensorBase& tokens, const at::TensorBase& ids_restore,
                            const at::TensorBase& mask_token, const at::TensorBase& out);
// grad [B, L, D] -> grad_tokens [B, K, D] and grad_mask_token [D] fp32 (sum over hidden rows).
void patch_scatter_bwd_cuda(const at::TensorBase& grad, const at::TensorBase& ids_restore,
                            const at::TensorBase& grad_tokens, const at::TensorBase& grad_mask_token);

// pred [B, L, p*p*C], imgs [B, C, H, W] (pred's dtype or fp32), mask [B, L] fp32 -> loss [] fp32.
void norm_pix_loss_fwd_cuda(const at::TensorBase& pred, const at::TensorBase& imgs, const at::TensorBase& mask,
                            int64_t patch_size, bool norm_pix, const at::TensorBase& loss);
// grad_loss [] fp32 -> grad_pred [B, L, p*p*C] (pred's dtype), every element written.
void norm_pix_loss_bwd_cuda(const at::TensorBase& grad_loss, const at::TensorBase& pred, const at::TensorBase& imgs,
                            const at::TensorBase& mask, int64_t patch_size, bool norm_pix,
                            const at::TensorBase& grad_pred);

// Largest patch vector (p*p*C elements) norm_pix_loss stages in shared memory: one warp holds one
// fp32 patch in the 47 KiB of dynamic shared memory a block may use (48 KiB without an opt-in, less
// 1 KiB kept for the kernels' static shared arrays). 16x16x3 = 768, 32x32x3 = 3072 fit.
constexpr int64_t kNormPixSmemBytes = 47 * 1024;
constexpr int64_t kNormPixMaxPatchElems = kNormPixSmemBytes / 4;

}  // namespace fastmask
