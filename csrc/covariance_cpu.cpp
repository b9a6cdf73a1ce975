// Upper-triangle second-moment update on the CPU: acc[d, d] (fp32) += Σ_{t: mask[t]} x_tᵀ x_t.
//
// Why GEMMs on block rows rather than hand-written loops: MKL's sgemm already runs near the
// machine's peak, and no loop nest written here would match it. What we can do better than
// `acc += xᵀx` is skip the strict lower triangle: block row i (rows [i, i+B)) only needs
// columns [i, d), so one GEMM of shape B × (d − i) × n per block row computes the upper
// triangle plus the lower half of each diagonal block. With B = 256 and d = 2048 that is
// 56% of the full product's flops (the limit is 50%) in GEMMs still large enough for MKL to
// run at full speed; smaller blocks cut flops but lose more in GEMM efficiency (measured:
// benchmarks/results/covariance.md). The caller mirrors the upper triangle on read.
//
// OpenMP does the one pass that is not a GEMM: gathering kept rows (mask), converting
// bf16/fp16 to fp32 (products of those are exact in fp32, so nothing is lost) and packing
// oddly strided input, into one contiguous fp32 buffer.
#include <torch/extension.h>

#include <omp.h>

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
void syrk_update(at::Tensor acc, const at::Tensor& x, const c10::optional<at::Tensor>& mask, int64_t block) {
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

  // One GEMM per block row over the columns at and right of the diagonal block.
  for (int64_t i = 0; i < d; i += block) {
    const int64_t b = std::min(block, d - i);
    at::Tensor out = acc.narrow(0, i, b).narrow(1, i, d - i);  // row stride d, column stride 1: BLAS-ready
    out.addmm_(xf.narrow(1, i, b).t(), xf.narrow(1, i, d - i));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pmkernels covariance: upper-triangle fp32 second-moment update on the CPU";
  m.def("syrk_update", &syrk_update, "acc[d,d] += sum over kept rows of x^T x (upper triangle)", py::arg("acc"),
        py::arg("x"), py::arg("mask") = py::none(), py::arg("block") = 256);
}
