// Streaming second moments on CUDA: the C launcher between csrc/covariance_cuda.cu (torch-free
// kernels) and csrc/covariance_cuda.cpp (the torch boundary).
#pragma once

#include <cuda_runtime.h>

// Element types of x for pmk_covariance_syrk_upper.
enum PmkCovDtype { PMK_COV_F32 = 0, PMK_COV_F16 = 1, PMK_COV_BF16 = 2 };

// acc[d, d] (fp32, row-major, leading dimension d) += sum over rows t < n with mask[t] != 0
// (mask may be NULL: every row) of x[t, :]^T x[t, :], on the upper tiles (i <= j) only; what
// the strict lower triangle holds afterwards is unspecified. x is row-major [n, d]
// (contiguous). bf16/fp16 run on tensor cores (WMMA, fp32 accumulation; needs sm_80+ for
// bf16); fp32 runs on tensor cores in tf32 when allow_tf32 != 0 (sm_80+), else in exact fp32
// FMAs. Returns the launch status (cudaErrorNotSupported when the device is too old).
cudaError_t pmk_covariance_syrk_upper(const void* x, int dtype, const unsigned char* mask, float* acc, long long n,
                                      int d, int allow_tf32, cudaStream_t stream);
