// Upper-triangle second-moment update on the CPU: acc[d, d] (fp32) += Σ_{t: mask[t]} x_tᵀ x_t.
//
// Why GEMMs on blocks rather than hand-written loops: MKL's sgemm already runs near the
// machine's peak, and no loop nest written here would match it. What we can do better than
// `acc += xᵀx` is skip the strict lower triangle: block row i (rows [i, i+B)) only needs
// columns [i, d). Each block row is cut into column spans ("tasks"), one GEMM of shape
// B × w × n each, computing the upper triangle plus the lower half of each diagonal block:
// with B = 128 and d = 2048 that is 53% of the full product's flops (the limit is 50%).
// OpenMP threads take whole tasks (largest first) and each GEMM runs single-threaded inside
// the parallel region; that beat MKL-threaded GEMMs per block row by 10–20% on 2 cores
// (measured: benchmarks/results/covariance.md). The caller mirrors the upper triangle on read.
//
// OpenMP also does the one pass that is not a GEMM: gathering kept rows (mask), converting
// bf16/fp16 to fp32 (products of those are exact in fp32, so nothing is lost) and packing
// oddly strided input, into one contiguous fp32 buffer.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

template <typename scalar_t>
void gather_rows_fp32(const at::Tensor& x, const std::vector<int64_t>& rows, at::Tensor& out) {
  const int64_t d = x.size(1);
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const scalar_t* src = x.data_ptr<scalar_t>();
  float* dst = out.data_ptr<float>();
  const int64_t m = static_cast<int64_t>(rows.size());
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (m * d > 32768)
  for (int64_t k = 0; k < m; ++k) {
    const scalar_t* row = src + rows[k] * s0;
    float* o = dst + k * d;
    for (int64_t j = 0; j < d; ++j) o[j] = static_cast<float>(row[j * s1]);
  }
}

// acc: fp32 [d, d], contiguous. x: [n, d] fp32/fp16/bf16, any strides. mask: bool [n] or None.
void syrk_update(at::Tensor acc, const at::Tensor& x, const c10::optional<at::Tensor>& mask, int64_t block,
                 int64_t tile_cols) {
  TORCH_CHECK(acc.device().is_cpu() && x.device().is_cpu(), "covariance_cpu: tensors must be on the CPU, got acc on ",
              acc.device(), " and x on ", x.device());
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "covariance_cpu: acc must be float32, got ", acc.scalar_type());
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == acc.size(1) && acc.is_contiguous(),
              "covariance_cpu: acc must be a contiguous square matrix, got sizes ", acc.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == acc.size(0), "covariance_cpu: x must be [n, ", acc.size(0), "], got ",
              x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "covariance_cpu: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(block >= 1, "covariance_cpu: block must be positive, got ", block);
  const int64_t n = x.size(0), d = x.size(1);
  bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == n,
                "covariance_cpu: mask must be a CPU bool tensor of shape [", n, "], got ", mask->scalar_type(), " ",
                mask->sizes());
  }
  if (n == 0) return;

  at::Tensor xf = x;
  const bool blas_ready = dt == at::kFloat && (x.stride(1) == 1 || x.stride(0) == 1);
  if (has_mask || !blas_ready) {
    std::vector<int64_t> rows;
    rows.reserve(n);
    if (has_mask) {
      at::Tensor mc = mask->contiguous();
      const bool* mp = mc.data_ptr<bool>();
      for (int64_t t = 0; t < n; ++t)
        if (mp[t]) rows.push_back(t);
    } else {
      for (int64_t t = 0; t < n; ++t) rows.push_back(t);
    }
    if (rows.empty()) return;
    xf = at::empty({static_cast<int64_t>(rows.size()), d}, x.options().dtype(at::kFloat));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "covariance_cpu_gather",
                                    [&] { gather_rows_fp32<scalar_t>(x, rows, xf); });
  }

  // One GEMM per upper-triangle task: block row [i, i+b) × column span [j, j+w), j >= i.
  // tile_cols <= 0: one task per block row (MKL threads each GEMM). Otherwise the block rows
  // are cut into spans of tile_cols columns and OpenMP threads take whole tasks, each GEMM
  // single-threaded (ATen/MKL run serially inside a parallel region): no per-GEMM barriers,
  // which on a shared or small machine cost more than the finer split.
  struct Task { int64_t i, b, j, w; };
  std::vector<Task> tasks;
  for (int64_t i = 0; i < d; i += block) {
    const int64_t b = std::min(block, d - i);
    if (tile_cols <= 0) {
      tasks.push_back({i, b, i, d - i});
    } else {
      for (int64_t j = i; j < d; j += tile_cols) tasks.push_back({i, b, j, std::min(tile_cols, d - j)});
    }
  }
  auto run = [&](const Task& t) {
    at::Tensor out = acc.narrow(0, t.i, t.b).narrow(1, t.j, t.w);  // row stride d, column stride 1: BLAS-ready
    out.addmm_(xf.narrow(1, t.i, t.b).t(), xf.narrow(1, t.j, t.w));
  };
  const int threads = at::get_num_threads();
  if (tile_cols <= 0 || threads <= 1 || tasks.size() < 2) {
    for (const Task& t : tasks) run(t);
    return;
  }
  // Largest first, then dynamic: the threads finish together.
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.b * a.w > b.b * b.w; });
  const int64_t nt = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t k = 0; k < nt; ++k) run(tasks[k]);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pmkernels covariance: upper-triangle fp32 second-moment update on the CPU";
  m.def("syrk_update", &syrk_update, "acc[d,d] += sum over kept rows of x^T x (upper triangle)", py::arg("acc"),
        py::arg("x"), py::arg("mask") = py::none(), py::arg("block") = 256, py::arg("tile_cols") = 0);
}
