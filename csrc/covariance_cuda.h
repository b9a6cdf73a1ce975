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
//
// Token split (small d, where the output tiles alone cannot fill the GPU): with
// 0 < rows_per_split < n, rows are cut into S = ceil(n / rows_per_split) ranges and acc must
// instead be a zeroed fp32 workspace [S, d, d]: range s stores its partial sums (upper tiles)
// into acc + s*d*d and the caller adds the S partials into the real accumulator in a fixed
// order. rows_per_split <= 0 adds straight into acc.
cudaError_t pmk_covariance_syrk_upper(const void* x, int dtype, const unsigned char* mask, float* acc, long long n,
                                      int d, int allow_tf32, long long rows_per_split, cudaStream_t stream);

// Output tiles (thread blocks per token range) the kernel for (d, dtype, allow_tf32) launches,
// and the rows per pipeline stage: a split should be a multiple of it. -1: d too large.
int pmk_covariance_upper_tiles(int d, int dtype, int allow_tf32);
int pmk_covariance_split_grain(int dtype, int allow_tf32);
