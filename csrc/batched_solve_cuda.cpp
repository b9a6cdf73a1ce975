// Torch boundary for the batched CUDA Cholesky solve (kernels in batched_solve_cuda.cu).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "batched_solve_cuda.h"

namespace {

std::vector<torch::Tensor> factor_solve(torch::Tensor A, torch::Tensor B) {
  TORCH_CHECK(A.is_cuda() && B.is_cuda(), "batched_solve_cuda: A and B must be CUDA tensors");
  TORCH_CHECK(A.device() == B.device(), "batched_solve_cuda: A and B are on different devices");
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "batched_solve_cuda: A must be [b, n, n], got ", A.sizes());
  TORCH_CHECK(B.dim() == 3 && B.size(0) == A.size(0) && B.size(1) == A.size(1),
              "batched_solve_cuda: B must be [b, n, m] matching A ", A.sizes(), ", got ", B.sizes());
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "batched_solve_cuda: A and B dtypes differ");
  TORCH_CHECK(A.scalar_type() == torch::kFloat32 || A.scalar_type() == torch::kFloat64,
              "batched_solve_cuda: float32 or float64 only, got ", A.scalar_type());
  TORCH_CHECK(A.is_contiguous() && B.is_contiguous(), "batched_solve_cuda: A and B must be contiguous");
  TORCH_CHECK(A.size(1) <= 1024 && A.size(2) <= 1024 && B.size(2) < (int64_t(1) << 20),
              "batched_solve_cuda: n <= 1024 only");
  TORCH_CHECK(A.size(0) < (int64_t(1) << 31), "batched_solve_cuda: batch too large");
  const c10::cuda::CUDAGuard guard(A.device());
  auto X = torch::empty_like(B);
  auto info = torch::zeros({A.size(0)}, A.options().dtype(torch::kInt32));
  const int b = static_cast<int>(A.size(0)), n = static_cast<int>(A.size(1)), m = static_cast<int>(B.size(2));
  if (b == 0 || n == 0) return {X, info};

  int dev = A.get_device(), optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t need = pmk_batched_chol_shared_bytes(n, A.element_size());
  // Keep 1 KiB for the kernel's static shared memory; otherwise factor in a global workspace.
  const bool shared = need + 1024 <= static_cast<size_t>(optin);
  torch::Tensor work = shared ? torch::Tensor() : torch::empty_like(A);
  auto stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (A.scalar_type() == torch::kFloat64) {
    err = pmk_batched_chol_solve_f64(A.data_ptr<double>(), B.data_ptr<double>(), X.data_ptr<double>(),
                                     shared ? nullptr : work.data_ptr<double>(), info.data_ptr<int>(), b, n, m,
                                     shared ? need : 0, stream);
  } else {
    err = pmk_batched_chol_solve_f32(A.data_ptr<float>(), B.data_ptr<float>(), X.data_ptr<float>(),
                                     shared ? nullptr : work.data_ptr<float>(), info.data_ptr<int>(), b, n, m,
                                     shared ? need : 0, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "batched_solve_cuda: launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {X, info};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("factor_solve", &factor_solve, "Batched Cholesky factor + solve on CUDA: (X, info)");
}
