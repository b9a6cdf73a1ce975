// Torch boundary for the CUDA second-moment update (kernels in covariance_cuda.cu): checks
// every tensor, then calls the torch-free C launcher on the current stream.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <climits>

#include "covariance_cuda.h"

namespace {

// acc[d, d] (fp32) += sum over kept rows of x^T x, upper tiles only (see covariance_cuda.h).
// With rows_per_split > 0 the kernel writes S = ceil(n / rows_per_split) partials into
// `workspace` (zeroed fp32 [S, d, d]) and they are added into acc here, in a fixed order.
void syrk_update(torch::Tensor acc, torch::Tensor x, c10::optional<torch::Tensor> mask, bool allow_tf32,
                 int64_t rows_per_split, c10::optional<torch::Tensor> workspace) {
  TORCH_CHECK(acc.is_cuda() && x.is_cuda(), "covariance_cuda: acc and x must be CUDA tensors, got acc on ",
              acc.device(), " and x on ", x.device());
  TORCH_CHECK(acc.device() == x.device(), "covariance_cuda: acc (", acc.device(), ") and x (", x.device(),
              ") are on different devices");
  TORCH_CHECK(acc.scalar_type() == torch::kFloat32, "covariance_cuda: acc must be float32, got ", acc.scalar_type());
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == acc.size(1), "covariance_cuda: acc must be square [d, d], got ",
              acc.sizes());
  TORCH_CHECK(acc.is_contiguous(), "covariance_cuda: acc must be contiguous");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == acc.size(0), "covariance_cuda: x must be [n, ", acc.size(0), "], got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "covariance_cuda: x must be contiguous (the Python wrapper copies strided input)");
  TORCH_CHECK(acc.size(0) <= INT_MAX, "covariance_cuda: d = ", acc.size(0), " is too large");
  int dtype;
  switch (x.scalar_type()) {
    case torch::kFloat32: dtype = PMK_COV_F32; break;
    case torch::kFloat16: dtype = PMK_COV_F16; break;
    case torch::kBFloat16: dtype = PMK_COV_BF16; break;
    default: TORCH_CHECK(false, "covariance_cuda: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  const unsigned char* mask_ptr = nullptr;
  torch::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = *mask;
    TORCH_CHECK(m.device() == x.device(), "covariance_cuda: mask (", m.device(), ") is not on x's device (", x.device(),
                ")");
    TORCH_CHECK(m.scalar_type() == torch::kBool, "covariance_cuda: mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == x.size(0), "covariance_cuda: mask must be [", x.size(0), "], got ",
                m.sizes());
    m = m.contiguous();
    mask_ptr = reinterpret_cast<const unsigned char*>(m.data_ptr<bool>());
  }
  if (x.size(0) == 0) return;
  const int64_t n = x.size(0), d = acc.size(0);
  const bool split = rows_per_split > 0 && rows_per_split < n;
  torch::Tensor ws;
  if (split) {
    const int64_t parts = (n + rows_per_split - 1) / rows_per_split;
    TORCH_CHECK(workspace.has_value() && workspace->defined(), "covariance_cuda: a split needs a workspace");
    ws = *workspace;
    TORCH_CHECK(ws.device() == acc.device() && ws.scalar_type() == torch::kFloat32 && ws.is_contiguous() &&
                    ws.dim() == 3 && ws.size(0) == parts && ws.size(1) == d && ws.size(2) == d,
                "covariance_cuda: workspace must be a contiguous float32 [", parts, ", ", d, ", ", d, "] on ",
                acc.device(), ", got ", ws.scalar_type(), " ", ws.sizes(), " on ", ws.device());
    TORCH_CHECK(parts <= 65535, "covariance_cuda: at most 65535 token ranges, got ", parts);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = pmk_covariance_syrk_upper(
      x.data_ptr(), dtype, mask_ptr, split ? ws.data_ptr<float>() : acc.data_ptr<float>(), n, static_cast<int>(d),
      allow_tf32 ? 1 : 0, split ? rows_per_split : 0, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "covariance_cuda: launch failed: ", cudaGetErrorString(err),
              err == cudaErrorNotSupported ? " (bf16/fp16/tf32 tensor cores need compute capability 8.0+)" : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (split) acc.add_(ws.sum(0));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("syrk_update", &syrk_update, "acc[d,d] += sum over kept rows of x^T x (upper tiles), on CUDA",
          py::arg("acc"), py::arg("x"), py::arg("mask") = py::none(), py::arg("allow_tf32") = false,
          py::arg("rows_per_split") = 0, py::arg("workspace") = py::none());
}
