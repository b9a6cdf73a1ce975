// Batched SPD solves on the CPU: X_i = A_i^{-1} B_i for many small matrices, one OpenMP
// thread per matrix. Right-looking Cholesky on the upper factor U = L^T (so that every inner
// loop is a contiguous axpy the compiler vectorizes), then U^T y = b and U x = y with the m
// right-hand sides as contiguous rows. A non-positive pivot stops that matrix and records its
// 1-based index in info; the host escalates jitter and retries only those matrices.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Per-matrix input statistics, gathered while the matrix is being copied (it is in cache then):
// max|a_ij - a_ji|, max|a_ij| and the number of non-finite entries (stats[0..2]).
template <typename T>
void copy_with_stats(const T* __restrict a_in, T* __restrict u, int64_t n, int64_t ld, double* __restrict stats) {
  double asym = 0, amax = 0, bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) {
      const T v = a_in[i * n + j];
      const T w = a_in[j * n + i];
      u[i * ld + j] = v;
      if (!std::isfinite(v) || !std::isfinite(w)) {
        bad += (!std::isfinite(v)) + (j != i && !std::isfinite(w));
        continue;
      }
      amax = std::max(amax, static_cast<double>(std::abs(v)));
      amax = std::max(amax, static_cast<double>(std::abs(w)));
      asym = std::max(asym, std::abs(static_cast<double>(v) - static_cast<double>(w)));
    }
  }
  stats[0] = asym;
  stats[1] = amax;
  stats[2] = bad;
}

// Rows of the working copy are padded to a multiple of kPad elements and every update loop
// starts at a kPad-aligned column: the short, ragged rows of a triangle (average length n/3)
// then run as whole vectors with no scalar remainder. The extra lanes only write entries left
// of the diagonal (the unused lower half, never read) or right of column n (padding).
constexpr int64_t kPad = 16;

template <typename T>
int64_t factor_solve_one(const T* __restrict a_in, const T* __restrict b_in, T* __restrict x, T* __restrict u,
                         int64_t n, int64_t m, double* __restrict stats) {
  const int64_t ld = (n + kPad - 1) / kPad * kPad;
  // u <- upper triangle of A (rows i, columns j >= i), row-major with stride ld.
  if (stats != nullptr) {
    double bad_b = 0;
    for (int64_t i = 0; i < n * m; ++i) bad_b += !std::isfinite(b_in[i]);
    stats[3] = bad_b;
    copy_with_stats<T>(a_in, u, n, ld, stats);
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) u[i * ld + j] = a_in[i * n + j];
  }
  for (int64_t k = 0; k < n; ++k) {
    T* uk = u + k * ld;
    const T akk = uk[k];
    if (!(akk > T(0))) return k + 1;  // also catches NaN
    const T piv = std::sqrt(akk);
    uk[k] = piv;
    const T inv = T(1) / piv;
    for (int64_t j = k + 1; j < n; ++j) uk[j] *= inv;
    for (int64_t i = k + 1; i < n; ++i) {
      const T f = uk[i];
      T* ui = u + i * ld;
#pragma omp simd
      for (int64_t j = i & ~(kPad - 1); j < ld; ++j) ui[j] -= f * uk[j];
    }
  }
  for (int64_t i = 0; i < n * m; ++i) x[i] = b_in[i];
  // Forward: U^T y = b. Row k of U is column k of L.
  for (int64_t k = 0; k < n; ++k) {
    const T* uk = u + k * ld;
    T* xk = x + k * m;
    const T inv = T(1) / uk[k];
#pragma omp simd
    for (int64_t c = 0; c < m; ++c) xk[c] *= inv;
    for (int64_t i = k + 1; i < n; ++i) {
      const T f = uk[i];
      T* xi = x + i * m;
#pragma omp simd
      for (int64_t c = 0; c < m; ++c) xi[c] -= f * xk[c];
    }
  }
  // Backward: U x = y.
  for (int64_t i = n - 1; i >= 0; --i) {
    const T* ui = u + i * ld;
    T* xi = x + i * m;
    for (int64_t j = i + 1; j < n; ++j) {
      const T f = ui[j];
      const T* xj = x + j * m;
#pragma omp simd
      for (int64_t c = 0; c < m; ++c) xi[c] -= f * xj[c];
    }
    const T inv = T(1) / ui[i];
#pragma omp simd
    for (int64_t c = 0; c < m; ++c) xi[c] *= inv;
  }
  return 0;
}

template <typename T>
void run(const torch::Tensor& A, const torch::Tensor& B, torch::Tensor& X, torch::Tensor& info, double* stats) {
  const int64_t b = A.size(0), n = A.size(1), m = B.size(2);
  const T* a = A.data_ptr<T>();
  const T* bb = B.data_ptr<T>();
  T* x = X.data_ptr<T>();
  int32_t* inf = info.data_ptr<int32_t>();
#pragma omp parallel
  {
    // Zero-filled once per thread: the padding and the lower half only ever hold finite values.
    std::vector<T> u(static_cast<size_t>(n * ((n + kPad - 1) / kPad * kPad)), T(0));
    // Dynamic chunks: on a shared machine one descheduled thread must not hold up the batch.
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < b; ++i) {
      inf[i] = static_cast<int32_t>(factor_solve_one<T>(a + i * n * n, bb + i * n * m, x + i * n * m, u.data(), n, m,
                                                        stats == nullptr ? nullptr : stats + 4 * i));
    }
  }
}

// The factorization with the input check fused into its copy-in: returns (X, info, stats)
// where stats [b, 3] fp64 is (max|a_ij - a_ji|, max|a_ij|, non-finite count) per matrix. The
// caller validates A from stats before trusting X (outputs are fresh tensors, A is unchanged);
// a fourth column counts the non-finite entries of B.
std::vector<torch::Tensor> factor_solve_checked(torch::Tensor A, torch::Tensor B);

std::vector<torch::Tensor> factor_solve_impl(torch::Tensor A, torch::Tensor B, bool with_stats) {
  TORCH_CHECK(A.device().is_cpu() && B.device().is_cpu(), "batched_solve_cpu: A and B must be CPU tensors");
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "batched_solve_cpu: A must be [b, n, n], got ", A.sizes());
  TORCH_CHECK(B.dim() == 3 && B.size(0) == A.size(0) && B.size(1) == A.size(1),
              "batched_solve_cpu: B must be [b, n, m] matching A ", A.sizes(), ", got ", B.sizes());
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "batched_solve_cpu: A and B dtypes differ");
  TORCH_CHECK(A.scalar_type() == torch::kFloat32 || A.scalar_type() == torch::kFloat64,
              "batched_solve_cpu: float32 or float64 only, got ", A.scalar_type());
  TORCH_CHECK(A.is_contiguous() && B.is_contiguous(), "batched_solve_cpu: A and B must be contiguous");
  auto X = torch::empty_like(B);
  auto info = torch::zeros({A.size(0)}, A.options().dtype(torch::kInt32));
  auto stats = torch::zeros({with_stats ? A.size(0) : 0, 4}, A.options().dtype(torch::kFloat64));
  if (A.size(0) > 0 && A.size(1) > 0) {
    double* sp = with_stats ? stats.data_ptr<double>() : nullptr;
    if (A.scalar_type() == torch::kFloat64)
      run<double>(A, B, X, info, sp);
    else
      run<float>(A, B, X, info, sp);
  }
  if (with_stats) return {X, info, stats};
  return {X, info};
}

std::vector<torch::Tensor> factor_solve(torch::Tensor A, torch::Tensor B) { return factor_solve_impl(A, B, false); }

std::vector<torch::Tensor> factor_solve_checked(torch::Tensor A, torch::Tensor B) {
  return factor_solve_impl(A, B, true);
}

template <typename T>
void stats_run(const torch::Tensor& A, torch::Tensor& out) {
  const int64_t b = A.size(0), n = A.size(1);
  const T* a = A.data_ptr<T>();
  double* o = out.data_ptr<double>();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < b; ++k) {
    const T* ak = a + k * n * n;
    double asym = 0, amax = 0, bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const double v = ak[i * n + j];
        if (!std::isfinite(v)) {
          bad += 1;
          continue;
        }
        amax = std::max(amax, std::abs(v));
        if (j > i) asym = std::max(asym, std::abs(v - static_cast<double>(ak[j * n + i])));
      }
    }
    o[3 * k] = asym;  // NaN-free: pairs with a non-finite member are counted in `bad` instead
    o[3 * k + 1] = amax;
    o[3 * k + 2] = bad;
  }
}

// One fused pass over A for input validation: per matrix (max|a_ij - a_ji|, max|a_ij|, number
// of non-finite entries), so that checking costs a fraction of the solve rather than several
// separate torch passes over the whole batch.
torch::Tensor check_stats(torch::Tensor A) {
  TORCH_CHECK(A.device().is_cpu() && A.dim() == 3 && A.size(1) == A.size(2) && A.is_contiguous(),
              "batched_solve_cpu.check_stats: A must be a contiguous CPU [b, n, n] tensor");
  auto out = torch::zeros({A.size(0), 3}, A.options().dtype(torch::kFloat64));
  if (A.scalar_type() == torch::kFloat64)
    stats_run<double>(A, out);
  else if (A.scalar_type() == torch::kFloat32)
    stats_run<float>(A, out);
  else
    TORCH_CHECK(false, "batched_solve_cpu.check_stats: float32 or float64 only");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("check_stats", &check_stats, "Per-matrix (max asymmetry, max |a|, non-finite count)");
  mod.def("factor_solve", &factor_solve, "Batched Cholesky factor + solve: (X, info)");
  mod.def("factor_solve_checked", &factor_solve_checked,
          "Batched Cholesky factor + solve with the input check fused in: (X, info, stats)");
}
