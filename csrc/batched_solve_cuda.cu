// Batched SPD solves on CUDA: one thread block per matrix, right-looking Cholesky in shared
// memory (global memory when the matrix does not fit), then both triangular solves with the
// block's threads spread over rows x right-hand sides. Torch-free; see batched_solve_cuda.h.
#include "batched_solve_cuda.h"

#include <cstdint>

namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T dev_sqrt(T v);
template <>
__device__ __forceinline__ float dev_sqrt<float>(float v) { return sqrtf(v); }
template <>
__device__ __forceinline__ double dev_sqrt<double>(double v) { return sqrt(v); }

// a: this block's n x n working copy (shared or global), row-major; lower triangle used.
template <typename T>
__device__ void chol_solve_block(T* a, const T* __restrict__ Ain, const T* __restrict__ Bin, T* __restrict__ X,
                                 int* info_out, int n, int m) {
  __shared__ int s_info;
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int idx = tid; idx < n * n; idx += nt) a[idx] = Ain[idx];
  if (tid == 0) s_info = 0;
  __syncthreads();
  for (int k = 0; k < n; ++k) {
    if (tid == 0) {
      const T akk = a[k * n + k];
      if (!(akk > T(0)))  // NaN too
        s_info = k + 1;
      else
        a[k * n + k] = dev_sqrt<T>(akk);
    }
    __syncthreads();
    if (s_info != 0) break;  // block-uniform: every thread read the same shared flag
    const T inv = T(1) / a[k * n + k];
    for (int i = k + 1 + tid; i < n; i += nt) a[i * n + k] *= inv;
    __syncthreads();
    const int r = n - k - 1;
    for (int idx = tid; idx < r * r; idx += nt) {
      const int i = k + 1 + idx / r, j = k + 1 + idx % r;
      if (j <= i) a[i * n + j] -= a[i * n + k] * a[j * n + k];
    }
    __syncthreads();
  }
  if (tid == 0) *info_out = s_info;
  if (s_info != 0) return;
  for (int idx = tid; idx < n * m; idx += nt) X[idx] = Bin[idx];
  __syncthreads();
  // L y = b
  for (int k = 0; k < n; ++k) {
    const T inv = T(1) / a[k * n + k];
    for (int c = tid; c < m; c += nt) X[k * m + c] *= inv;
    __syncthreads();
    const int r = n - k - 1;
    for (int idx = tid; idx < r * m; idx += nt) {
      const int i = k + 1 + idx / m, c = idx % m;
      X[i * m + c] -= a[i * n + k] * X[k * m + c];
    }
    __syncthreads();
  }
  // L^T x = y
  for (int k = n - 1; k >= 0; --k) {
    const T inv = T(1) / a[k * n + k];
    for (int c = tid; c < m; c += nt) X[k * m + c] *= inv;
    __syncthreads();
    for (int idx = tid; idx < k * m; idx += nt) {
      const int i = idx / m, c = idx % m;
      X[i * m + c] -= a[k * n + i] * X[k * m + c];
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) chol_solve_shared(const T* __restrict__ A, const T* __restrict__ B,
                                                             T* __restrict__ X, int* __restrict__ info, int n, int m) {
  extern __shared__ unsigned char smem_raw[];
  T* a = reinterpret_cast<T*>(smem_raw);
  const int64_t i = blockIdx.x;
  chol_solve_block<T>(a, A + i * n * n, B + i * n * m, X + i * n * m, info + i, n, m);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) chol_solve_global(const T* __restrict__ A, const T* __restrict__ B,
                                                             T* __restrict__ X, T* __restrict__ work,
                                                             int* __restrict__ info, int n, int m) {
  const int64_t i = blockIdx.x;
  chol_solve_block<T>(work + i * n * n, A + i * n * n, B + i * n * m, X + i * n * m, info + i, n, m);
}

template <typename T>
cudaError_t launch(const T* A, const T* B, T* X, T* work, int* info, int b, int n, int m, size_t smem_bytes,
                   cudaStream_t stream) {
  if (b == 0) return cudaSuccess;
  if (smem_bytes > 0) {
    if (smem_bytes > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(chol_solve_shared<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem_bytes));
      if (err != cudaSuccess) return err;
    }
    chol_solve_shared<T><<<b, kThreads, smem_bytes, stream>>>(A, B, X, info, n, m);
  } else {
    chol_solve_global<T><<<b, kThreads, 0, stream>>>(A, B, X, work, info, n, m);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pmk_batched_chol_solve_f32(const float* A, const float* B, float* X, float* work, int* info, int b,
                                       int n, int m, size_t smem_bytes, cudaStream_t stream) {
  return launch<float>(A, B, X, work, info, b, n, m, smem_bytes, stream);
}

cudaError_t pmk_batched_chol_solve_f64(const double* A, const double* B, double* X, double* work, int* info, int b,
                                       int n, int m, size_t smem_bytes, cudaStream_t stream) {
  return launch<double>(A, B, X, work, info, b, n, m, smem_bytes, stream);
}
