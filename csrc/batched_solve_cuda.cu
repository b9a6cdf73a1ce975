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

// a: this block's n x n working copy (shared or global), row-major with leading dimension lda
// (n + 1 in shared memory: a column walk then strides by an odd number of words' pairs, not by
// n, which at n = 64 put all 32 lanes of a warp on one bank); lower triangle used. colk: n
// values of shared scratch holding the current column of L, read by every thread of the
// trailing update as a broadcast.
template <typename T>
__device__ void chol_solve_block(T* a, int lda, T* colk, const T* __restrict__ Ain, const T* __restrict__ Bin,
                                 T* __restrict__ X, int* info_out, int n, int m) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int idx = tid; idx < n * n; idx += nt) a[(idx / n) * lda + idx % n] = Ain[idx];
  __syncthreads();
  int info = 0;
  for (int k = 0; k < n; ++k) {
    // Every thread reads the same pivot and takes the same branch: no serial step, no flag
    // broadcast, one barrier fewer per column.
    const T akk = a[k * lda + k];
    if (!(akk > T(0))) {  // NaN too
      info = k + 1;
      break;
    }
    const T lkk = dev_sqrt<T>(akk);
    const T inv = T(1) / lkk;
    // a[k][k] itself is written only after the barrier: other threads may still be reading akk.
    for (int i = k + tid; i < n; i += nt) {
      const T v = i == k ? lkk : a[i * lda + k] * inv;
      if (i != k) a[i * lda + k] = v;
      colk[i] = v;
    }
    __syncthreads();
    if (tid == 0) a[k * lda + k] = lkk;  // the trailing update below never touches column k
    // Trailing update of the lower triangle only, packed: t -> (i, j) with j <= i, so no thread
    // idles on the upper half (the square walk left half of them idle).
    const int r = n - k - 1;
    const int tri = r * (r + 1) / 2;
    for (int t = tid; t < tri; t += nt) {
      int ii = static_cast<int>((sqrtf(8.0f * static_cast<float>(t) + 1.0f) - 1.0f) * 0.5f);
      if ((ii + 1) * (ii + 2) / 2 <= t) ++ii;
      if (ii * (ii + 1) / 2 > t) --ii;
      const int jj = t - ii * (ii + 1) / 2;
      const int i = k + 1 + ii, j = k + 1 + jj;
      a[i * lda + j] -= colk[i] * colk[j];
    }
    __syncthreads();
  }
  if (tid == 0) *info_out = info;
  if (info != 0) return;  // block-uniform
  for (int idx = tid; idx < n * m; idx += nt) X[idx] = Bin[idx];
  __syncthreads();
  // L y = b
  for (int k = 0; k < n; ++k) {
    const T inv = T(1) / a[k * lda + k];
    for (int c = tid; c < m; c += nt) X[k * m + c] *= inv;
    __syncthreads();
    const int r = n - k - 1;
    for (int idx = tid; idx < r * m; idx += nt) {
      const int i = k + 1 + idx / m, c = idx % m;
      X[i * m + c] -= a[i * lda + k] * X[k * m + c];
    }
    __syncthreads();
  }
  // L^T x = y
  for (int k = n - 1; k >= 0; --k) {
    const T inv = T(1) / a[k * lda + k];
    for (int c = tid; c < m; c += nt) X[k * m + c] *= inv;
    __syncthreads();
    for (int idx = tid; idx < k * m; idx += nt) {
      const int i = idx / m, c = idx % m;
      X[i * m + c] -= a[k * lda + i] * X[k * m + c];
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) chol_solve_shared(const T* __restrict__ A, const T* __restrict__ B,
                                                             T* __restrict__ X, int* __restrict__ info, int n, int m) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* a = reinterpret_cast<T*>(smem_raw);
  const int lda = n + 1;
  const int64_t i = blockIdx.x;
  chol_solve_block<T>(a, lda, a + n * lda, A + i * n * n, B + i * n * m, X + i * n * m, info + i, n, m);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) chol_solve_global(const T* __restrict__ A, const T* __restrict__ B,
                                                             T* __restrict__ X, T* __restrict__ work,
                                                             int* __restrict__ info, int n, int m) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t i = blockIdx.x;
  chol_solve_block<T>(work + i * n * n, n, reinterpret_cast<T*>(smem_raw), A + i * n * n, B + i * n * m,
                      X + i * n * m, info + i, n, m);
}

template <typename T>
cudaError_t launch(const T* A, const T* B, T* X, T* work, int* info, int b, int n, int m, size_t smem_bytes,
                   cudaStream_t stream) {
  if (b == 0) return cudaSuccess;
  if (smem_bytes > 0) {
    if (smem_bytes < pmk_batched_chol_shared_bytes(n, sizeof(T))) return cudaErrorInvalidValue;
    if (smem_bytes > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(chol_solve_shared<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem_bytes));
      if (err != cudaSuccess) return err;
    }
    chol_solve_shared<T><<<b, kThreads, smem_bytes, stream>>>(A, B, X, info, n, m);
  } else {
    chol_solve_global<T><<<b, kThreads, static_cast<size_t>(n) * sizeof(T), stream>>>(A, B, X, work, info, n, m);
  }
  return cudaGetLastError();
}

}  // namespace

size_t pmk_batched_chol_shared_bytes(int n, size_t elem) {
  return (static_cast<size_t>(n) * (n + 1) + n) * elem;  // a (lda = n + 1) and colk
}

cudaError_t pmk_batched_chol_solve_f32(const float* A, const float* B, float* X, float* work, int* info, int b,
                                       int n, int m, size_t smem_bytes, cudaStream_t stream) {
  return launch<float>(A, B, X, work, info, b, n, m, smem_bytes, stream);
}

cudaError_t pmk_batched_chol_solve_f64(const double* A, const double* B, double* X, double* work, int* info, int b,
                                       int n, int m, size_t smem_bytes, cudaStream_t stream) {
  return launch<double>(A, B, X, work, info, b, n, m, smem_bytes, stream);
}
