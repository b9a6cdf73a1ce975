// Batched SPD solves on CUDA: the C launchers between csrc/batched_solve_cuda.cu (torch-free
// kernels) and csrc/batched_solve_cuda.cpp (the torch boundary).
#pragma once

#include <cstddef>
#include <cuda_runtime.h>

// X_i = A_i^{-1} B_i for b row-major matrices A [b, n, n] (lower triangle read) and B, X
// [b, n, m]; info [b] gets 0 or the 1-based pivot at which Cholesky met a non-positive value
// (X_i is then unspecified). smem_bytes > 0 factors each matrix in that much dynamic shared
// memory (>= pmk_batched_chol_shared_bytes(n, sizeof(T)): the matrix padded to n + 1 columns
// plus one column of scratch); smem_bytes == 0 factors in `work` [b, n, n] in global memory
// (with n * sizeof(T) bytes of dynamic shared scratch).
size_t pmk_batched_chol_shared_bytes(int n, size_t elem);
cudaError_t pmk_batched_chol_solve_f32(const float* A, const float* B, float* X, float* work, int* info, int b,
                                       int n, int m, size_t smem_bytes, cudaStream_t stream);
cudaError_t pmk_batched_chol_solve_f64(const double* A, const double* B, double* X, double* work, int* info, int b,
                                       int n, int m, size_t smem_bytes, cudaStream_t stream);
