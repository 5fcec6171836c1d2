// torch.library registration of the fastmask CUDA kernels as torch.ops.fastmask_cuda.*.
//
// Each op validates its inputs (one TORCH_CHECK per problem, before any work), allocates its
// outputs and calls the launcher in the matching .cu file. Autograd and the fake (shape-only)
// implementations that torch.compile traces are attached in Python, in
// fastmask/ops/cuda_backend.py. The namespace is fastmask_cuda, apart from the Triton backend's
// `fastmask` custom ops.
//
// The Python module fastmask._C holds no functions: importing it runs the TORCH_LIBRARY static
// initializers below, which is all it is for.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"

namespace fastmask {
namespace {

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_cuda_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "fastmask_cuda::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "fastmask_cuda::", op, ": ", name, " must be contiguous");
}

void check_same_device(const char* op, const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "fastmask_cuda::", op, ": ", na, " is on ", a.device(), " but ", nb,
              " is on ", b.device());
}

void check_ids(const char* op, const char* name, const at::Tensor& ids, int64_t B) {
  check_cuda_contiguous(op, name, ids);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "fastmask_cuda::", op, ": ", name, " must be int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B, "fastmask_cuda::", op, ": ", name, " must be [B=", B,
              ", *], got ", ids.sizes());
}

// imgs [B, C, H, W] with H, W multiples of p; returns L = (H/p) * (W/p).
int64_t check_images(const char* op, const at::Tensor& imgs, int64_t p) {
  check_cuda_contiguous(op, "imgs", imgs);
  TORCH_CHECK(imgs.dim() == 4, "fastmask_cuda::", op, ": imgs must be [B, C, H, W], got ", imgs.sizes());
  TORCH_CHECK(p > 0, "fastmask_cuda::", op, ": patch_size must be positive, got ", p);
  TORCH_CHECK(imgs.size(2) % p == 0 && imgs.size(3) % p == 0, "fastmask_cuda::", op, ": image size ",
              imgs.size(2), "x", imgs.size(3), " is not divisible by patch size ", p);
  TORCH_CHECK(imgs.size(1) * imgs.size(2) * imgs.size(3) < (int64_t{1} << 31), "fastmask_cuda::", op,
              ": one image must have fewer than 2^31 elements, got ", imgs.sizes());
  return (imgs.size(2) / p) * (imgs.size(3) / p);
}

// --- patch_gather ---------------------------------------------------------------------------

at::Tensor patch_gather_fwd(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size) {
  const char* op = "patch_gather_fwd";
  const int64_t L = check_images(op, imgs, patch_size);
  TORCH_CHECK(is_kernel_dtype(imgs.scalar_type()), "fastmask_cuda::", op, ": imgs must be fp32, fp16 or bf16, got ",
              imgs.scalar_type());
  check_ids(op, "ids_keep", ids_keep, imgs.size(0));
  check_same_device(op, imgs, "imgs", ids_keep, "ids_keep");
  TORCH_CHECK(ids_keep.size(1) <= L, "fastmask_cuda::", op, ": ids_keep keeps ", ids_keep.size(1),
              " patches of L=", L);
  const c10::cuda::CUDAGuard guard(imgs.device());
  at::Tensor out = at::empty({imgs.size(0), ids_keep.size(1), patch_size * patch_size * imgs.size(1)},
                             imgs.options());
  patch_gather_fwd_cuda(imgs, ids_keep, patch_size, out);
  return out;
}

at::Tensor patch_gather_bwd(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t patch_size,
                            int64_t channels, int64_t height, int64_t width) {
  const char* op = "patch_gather_bwd";
  check_cuda_contiguous(op, "grad", grad);
  TORCH_CHECK(is_kernel_dtype(grad.scalar_type()), "fastmask_cuda::", op, ": grad must be fp32, fp16 or bf16, got ",
              grad.scalar_type());
  TORCH_CHECK(patch_size > 0 && height % patch_size == 0 && width % patch_size == 0, "fastmask_cuda::", op,
              ": image size ", height, "x", width, " is not divisible by patch size ", patch_size);
  TORCH_CHECK(grad.dim() == 3 && grad.size(2) == patch_size * patch_size * channels, "fastmask_cuda::", op,
              ": grad must be [B, K, p*p*C=", patch_size * patch_size * channels, "], got ", grad.sizes());
  check_ids(op, "ids_keep", ids_keep, grad.size(0));
  check_same_device(op, grad, "grad", ids_keep, "ids_keep");
  TORCH_CHECK(ids_keep.size(1) == grad.size(1), "fastmask_cuda::", op, ": ids_keep has K=", ids_keep.size(1),
              " but grad has K=", grad.size(1));
  const c10::cuda::CUDAGuard guard(grad.device());
  // Hidden patches get no gradient: zero-fill, then the kernel writes the kept ones.
  at::Tensor grad_imgs = at::zeros({grad.size(0), channels, height, width}, grad.options());
  patch_gather_bwd_cuda(grad, ids_keep, patch_size, grad_imgs);
  return grad_imgs;
}

// --- patch_scatter --------------------------------------------------------------------------

void check_tokens(const char* op, const char* name, const at::Tensor& t) {
  check_cuda_contiguous(op, name, t);
  TORCH_CHECK(t.dim() == 3, "fastmask_cuda::", op, ": ", name, " must be [B, *, D], got ", t.sizes());
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "fastmask_cuda::", op, ": ", name,
              " must be fp32, fp16 or bf16, got ", t.scalar_type());
}

at::Tensor patch_scatter_fwd(const at::Tensor& tokens, const at::Tensor& ids_restore, const at::Tensor& mask_token) {
  const char* op = "patch_scatter_fwd";
  check_tokens(op, "tokens", tokens);
  check_ids(op, "ids_restore", ids_restore, tokens.size(0));
  check_cuda_contiguous(op, "mask_token", mask_token);
  check_same_device(op, tokens, "tokens", ids_restore, "ids_restore");
  check_same_device(op, tokens, "tokens", mask_token, "mask_token");
  TORCH_CHECK(ids_restore.size(1) >= tokens.size(1), "fastmask_cuda::", op, ": ids_restore has L=",
              ids_restore.size(1), " places for K=", tokens.size(1), " tokens");
  TORCH_CHECK(mask_token.dim() == 1 && mask_token.size(0) == tokens.size(2), "fastmask_cuda::", op,
              ": mask_token must be [D=", tokens.size(2), "], got ", mask_token.sizes());
  TORCH_CHECK(mask_token.is_floating_point(), "fastmask_cuda::", op, ": mask_token must be floating point, got ",
              mask_token.scalar_type());
  const c10::cuda::CUDAGuard guard(tokens.device());
  // As the reference: the mask token enters in the tokens' dtype (a D-element cast). Its gradient
  // comes back in fp32 from patch_scatter_bwd, so an fp32 parameter keeps an fp32 sum.
  const at::Tensor mt = mask_token.scalar_type() == tokens.scalar_type() ? mask_token
                                                                          : mask_token.to(tokens.scalar_type());
  at::Tensor out = at::empty({tokens.size(0), ids_restore.size(1), tokens.size(2)}, tokens.options());
  patch_scatter_fwd_cuda(tokens, ids_restore, mt, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> patch_scatter_bwd(const at::Tensor& grad, const at::Tensor& ids_restore,
                                                     int64_t num_kept) {
  const char* op = "patch_scatter_bwd";
  check_tokens(op, "grad", grad);
  check_ids(op, "ids_restore", ids_restore, grad.size(0));
  check_same_device(op, grad, "grad", ids_restore, "ids_restore");
  TORCH_CHECK(ids_restore.size(1) == grad.size(1), "fastmask_cuda::", op, ": ids_restore has L=",
              ids_restore.size(1), " but grad has L=", grad.size(1));
  TORCH_CHECK(0 <= num_kept && num_kept <= grad.size(1), "fastmask_cuda::", op, ": num_kept=", num_kept,
              " outside [0, L=", grad.size(1), "]");
  const c10::cuda::CUDAGuard guard(grad.device());
  // Every visible row is written once (ids_restore is a permutation), so no zero-fill.
  at::Tensor grad_tokens = at::empty({grad.size(0), num_kept, grad.size(2)}, grad.options());
  at::Tensor grad_mask_token = at::empty({grad.size(2)}, grad.options().dtype(at::kFloat));
  patch_scatter_bwd_cuda(grad, ids_restore, grad_tokens, grad_mask_token);
  return {grad_tokens, grad_mask_token};
}

// --- norm_pix_loss --------------------------------------------------------------------------

void check_norm_pix_inputs(const char* op, const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask,
                           int64_t patch_size) {
  const int64_t L = check_images(op, imgs, patch_size);
  check_cuda_contiguous(op, "pred", pred);
  check_cuda_contiguous(op, "mask", mask);
  const int64_t B = imgs.size(0), D = patch_size * patch_size * imgs.size(1);
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == B && pred.size(1) == L && pred.size(2) == D, "fastmask_cuda::",
              op, ": pred must be [B, L, p*p*C] = [", B, ", ", L, ", ", D, "], got ", pred.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == L, "fastmask_cuda::", op,
              ": mask must be [B, L] = [", B, ", ", L, "], got ", mask.sizes());
  TORCH_CHECK(is_kernel_dtype(pred.scalar_type()), "fastmask_cuda::", op, ": pred must be fp32, fp16 or bf16, got ",
              pred.scalar_type());
  TORCH_CHECK(imgs.scalar_type() == pred.scalar_type() || imgs.scalar_type() == at::kFloat, "fastmask_cuda::", op,
              ": imgs must be pred's dtype (", pred.scalar_type(), ") or fp32, got ", imgs.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kFloat, "fastmask_cuda::", op, ": mask must be fp32, got ",
              mask.scalar_type());
  TORCH_CHECK(D <= kNormPixMaxPatchElems, "fastmask_cuda::", op, ": patch vector of ", D, " elements exceeds ",
              kNormPixMaxPatchElems);
  check_same_device(op, pred, "pred", imgs, "imgs");
  check_same_device(op, pred, "pred", mask, "mask");
}

at::Tensor norm_pix_loss_fwd(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask,
                             int64_t patch_size, bool norm_pix) {
  check_norm_pix_inputs("norm_pix_loss_fwd", pred, imgs, mask, patch_size);
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
  norm_pix_loss_fwd_cuda(pred, imgs, mask, patch_size, norm_pix, loss);
  return loss;
}

at::Tensor norm_pix_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& imgs,
                             const at::Tensor& mask, int64_t patch_size, bool norm_pix) {
  const char* op = "norm_pix_loss_bwd";
  check_norm_pix_inputs(op, pred, imgs, mask, patch_size);
  check_cuda_contiguous(op, "grad_loss", grad_loss);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat, "fastmask_cuda::", op,
              ": grad_loss must be one fp32 element, got ", grad_loss.sizes(), " ", grad_loss.scalar_type());
  check_same_device(op, pred, "pred", grad_loss, "grad_loss");
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor grad_pred = at::empty_like(pred);
  norm_pix_loss_bwd_cuda(grad_loss, pred, imgs, mask, patch_size, norm_pix, grad_pred);
  return grad_pred;
}

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY(fastmask_cuda, m) {
  m.def("patch_gather_fwd(Tensor imgs, Tensor ids_keep, int patch_size) -> Tensor");
  m.def("patch_gather_bwd(Tensor grad, Tensor ids_keep, int patch_size, int channels, int height, int width) -> Tensor");
  m.def("patch_scatter_fwd(Tensor tokens, Tensor ids_restore, Tensor mask_token) -> Tensor");
  m.def("patch_scatter_bwd(Tensor grad, Tensor ids_restore, int num_kept) -> (Tensor, Tensor)");
  m.def("norm_pix_loss_fwd(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix) -> Tensor");
  m.def("norm_pix_loss_bwd(Tensor grad_loss, Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmask_cuda, CUDA, m) {
  m.impl("patch_gather_fwd", &fastmask::patch_gather_fwd);
  m.impl("patch_gather_bwd", &fastmask::patch_gather_bwd);
  m.impl("patch_scatter_fwd", &fastmask::patch_scatter_fwd);
  m.impl("patch_scatter_bwd", &fastmask::patch_scatter_bwd);
  m.impl("norm_pix_loss_fwd", &fastmask::norm_pix_loss_fwd);
  m.impl("norm_pix_loss_bwd", &fastmask::norm_pix_loss_bwd);
}

// The extension module itself: empty, importing it loads the library and registers the ops.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "fastmask CUDA kernels, registered as torch.ops.fastmask_cuda", -1, nullptr};
  return PyModule_Create(&module_def);
}
