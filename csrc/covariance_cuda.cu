// Upper-triangle second-moment update on CUDA tensor cores: acc += xᵀx over tile pairs i <= j.
//
// Same tiling as the Triton kernel: a 1-D grid over the t(t+1)/2 upper tile pairs of the
// d × d output (t = ceil(d / TILE)); each thread block owns one output tile and walks the whole
// token chunk, so no atomics are needed and the summation order is fixed. Rows with mask 0
// (padding) or past n load as zeros. Torch-free: the torch boundary is covariance_cuda.cpp.
//
// Tensor-core path (bf16/fp16, and fp32 as tf32 when allowed): WMMA 16x16x16 (16x16x8 for
// tf32) with fp32 accumulators; 128 x 128 output tile, 8 warps in 2 x 4, each 64 x 32
// (4 x 2 fragments); 32 tokens per shared-memory stage, the next stage's global loads kept in
// registers while the current one multiplies (16-byte vector loads when d allows).
// Exact-fp32 path: a SIMT kernel (64 x 64 tile, 4 x 4 outputs per thread, FMA in fp32),
// because fp32 without tf32 has no tensor-core instruction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "covariance_cuda.h"

namespace {

using namespace nvcuda;

constexpr int TILE = 128;            // output tile side for the tensor-core kernel
constexpr int BK = 32;               // tokens per shared-memory stage
constexpr int WARPS = 8;             // 2 (tile rows) x 4 (tile cols)
constexpr int THREADS = WARPS * 32;
constexpr int PAD = 8;               // row padding (elements) of the shared tiles: fewer bank conflicts
constexpr int LDS = TILE + PAD;      // 136: rows stay 16-byte (vectors) and 32-byte (WMMA) aligned

// pid = j(j+1)/2 + i with 0 <= i <= j: the column-major enumeration of upper tile pairs.
__device__ __forceinline__ void tile_pair(long long pid, int& ti, int& tj) {
  int j = static_cast<int>((sqrt(8.0 * static_cast<double>(pid) + 1.0) - 1.0) * 0.5);
  while (static_cast<long long>(j + 1) * (j + 2) / 2 <= pid) ++j;
  while (static_cast<long long>(j) * (j + 1) / 2 > pid) --j;
  tj = j;
  ti = static_cast<int>(pid - static_cast<long long>(j) * (j + 1) / 2);
}

// WMMA fragment element type and k-depth per input type.
template <typename T> struct Mma;
template <> struct Mma<__half> { using frag = __half; static constexpr int K = 16; };
template <> struct Mma<__nv_bfloat16> { using frag = __nv_bfloat16; static constexpr int K = 16; };
template <> struct Mma<float> { using frag = wmma::precision::tf32; static constexpr int K = 8; };

template <int BYTES> struct Raw;
template <> struct Raw<2> { using type = unsigned short; };
template <> struct Raw<4> { using type = unsigned int; };

// Global -> registers -> shared staging of the two operand tiles x[k0:k0+BK, ci:ci+TILE] and
// x[k0:k0+BK, cj:cj+TILE]. Moves raw bits: a zero bit pattern is +0 in every input type.
template <typename T, bool VEC>
struct Stage {
  static constexpr int VW = VEC ? 16 / static_cast<int>(sizeof(T)) : 1;
  using R = typename std::conditional<VEC, uint4, typename Raw<sizeof(T)>::type>::type;
  static constexpr int PER_ROW = TILE / VW;
  static constexpr int COUNT = BK * PER_ROW / THREADS;
  static_assert(COUNT * THREADS == BK * PER_ROW, "stage must split evenly over the threads");
  R a[COUNT], b[COUNT];

  __device__ __forceinline__ void load(const T* __restrict__ x, const unsigned char* __restrict__ mask, long long n,
                                       int d, long long k0, int ci, int cj) {
#pragma unroll
    for (int q = 0; q < COUNT; ++q) {
      const int e = threadIdx.x + q * THREADS;
      const int k = e / PER_ROW;
      const int c = (e % PER_ROW) * VW;
      const long long row = k0 + k;
      const bool keep = row < n && (mask == nullptr || __ldg(mask + row) != 0);
      const T* base = x + row * static_cast<long long>(d);
      // With VEC, d % VW == 0: a vector is wholly inside or wholly past column d.
      a[q] = (keep && ci + c < d) ? *reinterpret_cast<const R*>(base + ci + c) : R{};
      b[q] = (keep && cj + c < d) ? *reinterpret_cast<const R*>(base + cj + c) : R{};
    }
  }

  __device__ __forceinline__ void store(T* As, T* Bs) const {
#pragma unroll
    for (int q = 0; q < COUNT; ++q) {
      const int e = threadIdx.x + q * THREADS;
      const int k = e / PER_ROW;
      const int c = (e % PER_ROW) * VW;
      *reinterpret_cast<R*>(As + k * LDS + c) = a[q];
      *reinterpret_cast<R*>(Bs + k * LDS + c) = b[q];
    }
  }
};

// Token split: block (pair, s) sums rows [s * rows_per_split, min(n, (s + 1) * rows_per_split)).
// With gridDim.y == 1 it adds into acc; otherwise it stores its partial tile into
// acc + s * d * d (a zeroed [S, d, d] workspace the caller reduces in a fixed order).
// Minimum blocks per SM: 2 (at most 128 registers, so two 8-warp blocks share an SM and the
// second hides the first's barrier and epilogue stalls) for the 16-bit vector-load variants,
// which fit without spills (122-123 registers on sm_90a). The tf32 and scalar-load variants
// keep their registers in flight for the next stage and spill 140-680 bytes under that cap, so
// they stay at 1 (see benchmarks/RESULTS.md, GPU readiness).
template <typename T, bool VEC>
constexpr int min_blocks() { return (VEC && sizeof(T) == 2) ? 2 : 1; }

template <typename T, bool VEC>
__global__ void __launch_bounds__(THREADS, min_blocks<T, VEC>())
syrk_upper_wmma(const T* __restrict__ x, const unsigned char* __restrict__ mask, float* __restrict__ acc, long long n,
                int d, long long rows_per_split) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using F = typename Mma<T>::frag;
  constexpr int KF = Mma<T>::K;
  __shared__ __align__(128) T As[BK * LDS];
  __shared__ __align__(128) T Bs[BK * LDS];
  __shared__ __align__(128) float staging[WARPS][16 * 16];

  int ti, tj;
  tile_pair(blockIdx.x, ti, tj);
  const int ci = ti * TILE, cj = tj * TILE;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // this warp's 64 x 32 block of the tile

  wmma::fragment<wmma::accumulator, 16, 16, KF, float> c[4][2];
#pragma unroll
  for (int fi = 0; fi < 4; ++fi)
#pragma unroll
    for (int fj = 0; fj < 2; ++fj) wmma::fill_fragment(c[fi][fj], 0.0f);

  const long long r0 = static_cast<long long>(blockIdx.y) * rows_per_split;
  const long long r1 = r0 + rows_per_split < n ? r0 + rows_per_split : n;
  const bool split = gridDim.y > 1;
  Stage<T, VEC> st;
  if (r0 < r1) st.load(x, mask, r1, d, r0, ci, cj);
  for (long long k0 = r0; k0 < r1; k0 += BK) {
    __syncthreads();  // the previous stage's MMAs are done with As/Bs
    st.store(As, Bs);
    __syncthreads();
    if (k0 + BK < r1) st.load(x, mask, r1, d, k0 + BK, ci, cj);  // in flight during the MMAs
#pragma unroll
    for (int kk = 0; kk < BK; kk += KF) {
      // A = x[k, ci + m] stored [k][m]: as the M x K operand that is column-major, ldm = LDS.
      wmma::fragment<wmma::matrix_a, 16, 16, KF, F, wmma::col_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, KF, F, wmma::row_major> fb[2];
#pragma unroll
      for (int fi = 0; fi < 4; ++fi) {
        wmma::load_matrix_sync(fa[fi], As + kk * LDS + wm * 64 + fi * 16, LDS);
        if constexpr (std::is_same<T, float>::value) {
#pragma unroll
          for (int t = 0; t < fa[fi].num_elements; ++t) fa[fi].x[t] = wmma::__float_to_tf32(fa[fi].x[t]);
        }
      }
#pragma unroll
      for (int fj = 0; fj < 2; ++fj) {
        wmma::load_matrix_sync(fb[fj], Bs + kk * LDS + wn * 32 + fj * 16, LDS);
        if constexpr (std::is_same<T, float>::value) {
#pragma unroll
          for (int t = 0; t < fb[fj].num_elements; ++t) fb[fj].x[t] = wmma::__float_to_tf32(fb[fj].x[t]);
        }
      }
#pragma unroll
      for (int fi = 0; fi < 4; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) wmma::mma_sync(c[fi][fj], fa[fi], fb[fj], c[fi][fj]);
    }
  }

  // Epilogue: each warp stages one 16 x 16 fragment at a time and adds it into acc in bounds.
  float* stage = staging[warp];
  float* out = split ? acc + static_cast<long long>(blockIdx.y) * d * d : acc;
#pragma unroll
  for (int fi = 0; fi < 4; ++fi) {
#pragma unroll
    for (int fj = 0; fj < 2; ++fj) {
      wmma::store_matrix_sync(stage, c[fi][fj], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int gi = ci + wm * 64 + fi * 16 + e / 16;
        const int gj = cj + wn * 32 + fj * 16 + e % 16;
        if (gi < d && gj < d) {
          float* o = out + static_cast<long long>(gi) * d + gj;
          *o = split ? stage[e] : *o + stage[e];
        }
      }
      __syncwarp();
    }
  }
#endif
}

// Exact fp32: no tensor-core instruction multiplies fp32 without rounding to tf32.
// Each thread reads its 4 A and 4 B values of a k-row as one float4 each: with scalar reads the
// B reads (stride 4 words across the 16 threads of a row group) hit each bank twice.
constexpr int STILE = 64, SBK = 16, SLDS = STILE + 4;  // SLDS * 4 bytes keeps rows 16-byte aligned

__global__ void __launch_bounds__(256, 2)
syrk_upper_simt_f32(const float* __restrict__ x, const unsigned char* __restrict__ mask, float* __restrict__ acc,
                    long long n, int d, long long rows_per_split) {
  __shared__ __align__(16) float As[SBK * SLDS];
  __shared__ __align__(16) float Bs[SBK * SLDS];
  int ti, tj;
  tile_pair(blockIdx.x, ti, tj);
  const int ci = ti * STILE, cj = tj * STILE;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const long long r0 = static_cast<long long>(blockIdx.y) * rows_per_split;
  const long long r1 = r0 + rows_per_split < n ? r0 + rows_per_split : n;
  float c[4][4] = {};
  for (long long k0 = r0; k0 < r1; k0 += SBK) {
#pragma unroll
    for (int q = 0; q < SBK * STILE / 256; ++q) {
      const int e = threadIdx.x + q * 256;
      const int k = e / STILE, col = e % STILE;
      const long long row = k0 + k;
      const bool keep = row < r1 && (mask == nullptr || __ldg(mask + row) != 0);
      const float* base = x + row * static_cast<long long>(d);
      As[k * SLDS + col] = (keep && ci + col < d) ? base[ci + col] : 0.0f;
      Bs[k * SLDS + col] = (keep && cj + col < d) ? base[cj + col] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < SBK; ++k) {
      const float4 a4 = *reinterpret_cast<const float4*>(As + k * SLDS + ty * 4);
      const float4 b4 = *reinterpret_cast<const float4*>(Bs + k * SLDS + tx * 4);
      const float a[4] = {a4.x, a4.y, a4.z, a4.w};
      const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int s = 0; s < 4; ++s) c[r][s] = fmaf(a[r], b[s], c[r][s]);
    }
    __syncthreads();
  }
  const bool split = gridDim.y > 1;
  float* out = split ? acc + static_cast<long long>(blockIdx.y) * d * d : acc;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int gi = ci + ty * 4 + r;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int gj = cj + tx * 4 + s;
      if (gi < d && gj < d) {
        float* o = out + static_cast<long long>(gi) * d + gj;
        *o = split ? c[r][s] : *o + c[r][s];
      }
    }
  }
}

long long upper_pairs(int d, int tile) {
  const long long t = (static_cast<long long>(d) + tile - 1) / tile;
  return t * (t + 1) / 2;
}

// The grid's token dimension: rows_per_split <= 0 means one range (no split).
long long split_rows(long long n, long long rows_per_split) { return rows_per_split <= 0 ? n : rows_per_split; }

template <typename T>
cudaError_t launch_wmma(const T* x, const unsigned char* mask, float* acc, long long n, int d,
                        long long rows_per_split, cudaStream_t stream) {
  const long long blocks = upper_pairs(d, TILE);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  const long long rows = split_rows(n, rows_per_split);
  if ((n + rows - 1) / rows > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((n + rows - 1) / rows));
  constexpr int vw = 16 / static_cast<int>(sizeof(T));
  const bool vec = d % vw == 0 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0;
  if (vec)
    syrk_upper_wmma<T, true><<<grid, THREADS, 0, stream>>>(x, mask, acc, n, d, rows);
  else
    syrk_upper_wmma<T, false><<<grid, THREADS, 0, stream>>>(x, mask, acc, n, d, rows);
  return cudaGetLastError();
}

}  // namespace

int pmk_covariance_upper_tiles(int d, int dtype, int allow_tf32) {
  const long long t = upper_pairs(d, (dtype == PMK_COV_F32 && !allow_tf32) ? STILE : TILE);
  return t > 0x7fffffffLL ? -1 : static_cast<int>(t);
}

int pmk_covariance_split_grain(int dtype, int allow_tf32) { return (dtype == PMK_COV_F32 && !allow_tf32) ? SBK : BK; }

cudaError_t pmk_covariance_syrk_upper(const void* x, int dtype, const unsigned char* mask, float* acc, long long n,
                                      int d, int allow_tf32, long long rows_per_split, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return cudaSuccess;
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case PMK_COV_F16:
      if (major < 8) return cudaErrorNotSupported;  // the kernel body is compiled for sm_80+
      return launch_wmma(static_cast<const __half*>(x), mask, acc, n, d, rows_per_split, stream);
    case PMK_COV_BF16:
      if (major < 8) return cudaErrorNotSupported;
      return launch_wmma(static_cast<const __nv_bfloat16*>(x), mask, acc, n, d, rows_per_split, stream);
    case PMK_COV_F32:
      if (allow_tf32) {
        if (major < 8) return cudaErrorNotSupported;
        return launch_wmma(static_cast<const float*>(x), mask, acc, n, d, rows_per_split, stream);
      } else {
        const long long blocks = upper_pairs(d, STILE);
        if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
        const long long rows = split_rows(n, rows_per_split);
        if ((n + rows - 1) / rows > 65535) return cudaErrorInvalidValue;
        const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((n + rows - 1) / rows));
        syrk_upper_simt_f32<<<grid, 256, 0, stream>>>(static_cast<const float*>(x), mask, acc, n, d, rows);
        return cudaGetLastError();
      }
    default:
      return cudaErrorInvalidValue;
  }
}
