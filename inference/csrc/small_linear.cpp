// fp32 matmuls of a few rows against a plain row-major weight (inference/kernels.py).
//
// One chat's decode step multiplies a single row by every weight: the step is
// a stream of ~540 MB of fp32 weights for SmolLM2-135M, read once each. The
// GEMM libraries torch calls treat that as a thin GEMM (oneDNN, on weights
// packed for batches) or an sgemv (MKL) and read the weights at about 17-18
// GB/s on the 2-core EPYC; one pass over each weight row with a dot product per
// input row read them at 22-24 GB/s, as fast as a plain sum over the same
// weights (docs/BENCHMARKS.md "One stream's matmuls"). Each output element is still one fp32 dot product over the input
// row, summed in another order (vector lanes, then across them).
//
// Output rows are split between the calling thread's torch count of OpenMP
// threads (not at::parallel_for: see paged_attention.cpp), statically, so a
// result does not depend on the timing of the threads.
#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

namespace {

constexpr int64_t kMaxRows = 8;

// y [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]).
template <int M>
void rows_times_weight(const float* x, const float* w, const float* bias, float* y, int64_t n, int64_t k) {
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t j = 0; j < n; ++j) {
    const float* row = w + j * k;
    float dots[M];
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * k;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < k; ++i) dot += xm[i] * row[i];
      dots[m] = dot;
    }
    const float b = bias ? bias[j] : 0.f;
    for (int m = 0; m < M; ++m) y[m * n + j] = dots[m] + b;
  }
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "x [M, K] and weight [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "fp32 expected");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous x and weight expected");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(m <= kMaxRows, "small_linear takes at most ", kMaxRows, " rows, got ", m);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "fp32 bias [N] expected");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (m) {
    case 0: break;  // a step that samples nothing
    case 1: rows_times_weight<1>(xp, wp, b, yp, n, k); break;
    case 2: rows_times_weight<2>(xp, wp, b, yp, n, k); break;
    case 3: rows_times_weight<3>(xp, wp, b, yp, n, k); break;
    case 4: rows_times_weight<4>(xp, wp, b, yp, n, k); break;
    case 5: rows_times_weight<5>(xp, wp, b, yp, n, k); break;
    case 6: rows_times_weight<6>(xp, wp, b, yp, n, k); break;
    case 7: rows_times_weight<7>(xp, wp, b, yp, n, k); break;
    default: rows_times_weight<8>(xp, wp, b, yp, n, k); break;
  }
  return y;
}

}  // namespace

// The schema is defined from Python (inference.kernels), as paged_decode_attention's.
TORCH_LIBRARY_IMPL(chatapp, CPU, m) { m.impl("small_linear", &small_linear); }
