// fp32 matmuls of a few rows against a plain row-major fp32 or bf16 weight (inference/kernels.py).
//
// One chat's decode step multiplies a single row by every weight: the step is
// a stream of ~540 MB of fp32 weights for SmolLM2-135M, read once each. The
// GEMM libraries torch calls treat that as a thin GEMM (oneDNN, on weights
// packed for batches) or an sgemv (MKL) and read the weights at about 17-18
// GB/s on the 2-core EPYC; one pass over each weight row with a dot product per
// input row read them at 22-24 GB/s, as fast as a plain sum over the same
// weights (docs/BENCHMARKS.md "One stream's matmuls"). Each output element
// is still one fp32 dot product over the input row, summed in another order
// (vector lanes, then across them).
//
// bf16 weights (EngineConfig.quantization "bf16_weight_only") halve the bytes:
// each weight is widened to fp32 in registers (a shift, which vectorizes) and
// the product is summed in fp32 with the fp32 input rows, so only the weights'
// rounding to bf16 is lost, never an activation or a sum.
//
// Output rows are split between the calling thread's torch count of OpenMP
// threads (not at::parallel_for: see paged_attention.cpp), statically, so a
// result does not depend on the timing of the threads.
#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;  // fp32 weights, or bf16 without AVX-512
constexpr int64_t kMaxBf16Rows = 32;  // bf16 weights on AVX-512

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  // bf16 is the top half of an fp32.
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]), in fp32 whatever w is stored in.
template <int M, typename W>
void rows_times_weight(const float* x, const W* w, const float* bias, float* y, int64_t n, int64_t k) {
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t j = 0; j < n; ++j) {
    const W* row = w + j * k;
    float dots[M];
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * k;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < k; ++i) dot += xm[i] * widen(row[i]);
      dots[m] = dot;
    }
    const float b = bias ? bias[j] : 0.f;
    for (int m = 0; m < M; ++m) y[m * n + j] = dots[m] + b;
  }
}

#if defined(__AVX512F__)
// bf16 weights on AVX-512: four weight rows at a time, each (input row, weight
// row) pair summed in its own 16-lane register. The loop above keeps one
// accumulator and reads the input row once per weight row; there the widening
// and the FMA's latency, not memory, set the pace: on the 2-core AMX Xeon it
// streamed a one-row forward's 269 MB of bf16 weights at 13 GB/s, where a
// plain sum reads 23.5 GB/s (and from cache it took 7.7 ms over them against
// 8.7 ms over fp32's 538 MB). Four independent sums hide the latency and share
// each input load; with the prefetch below, 17 GB/s. Each output is still one fp32 dot product of its own rows,
// in an order fixed by k alone (16 lanes, then across them), whatever the
// thread count.
constexpr int kPrefetchBlocks = 4;

inline __m512 widen16(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// M input rows against R weight rows: M * R accumulators, M input loads and
// one widened weight row live in registers (32 on AVX-512), hence R = 4 for
// groups of up to four input rows and R = 2 for groups of up to eight
// (8 x 2 + 8 + 1 = 25). Each output's sum is its own register's, over k in
// the same order whatever M and R are, so a row's bits do not depend on how
// many rows the call has: the same whether a sequence decodes alone or
// beside 31 others.
template <int M, int R>
inline void group_times_rows(const float* x, const c10::BFloat16* const* w_rows, int rows, const float* bias,
                             float* y, int64_t n, int64_t j0, int64_t k) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    __m512 xs[M];
    for (int m = 0; m < M; ++m) xs[m] = _mm512_loadu_ps(x + m * k + i);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = widen16(w_rows[r] + i);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(xs[m], wv, acc[m][r]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float b = bias ? bias[j0 + r] : 0.f;
    for (int m = 0; m < M; ++m) y[m * n + j0 + r] = _mm512_reduce_add_ps(acc[m][r]) + b;
  }
}

template <int R>
inline void group_dispatch(int m, const float* x, const c10::BFloat16* const* w_rows, int rows, const float* bias,
                           float* y, int64_t n, int64_t j0, int64_t k) {
  switch (m) {
    case 1: group_times_rows<1, R>(x, w_rows, rows, bias, y, n, j0, k); break;
    case 2: group_times_rows<2, R>(x, w_rows, rows, bias, y, n, j0, k); break;
    case 3: group_times_rows<3, R>(x, w_rows, rows, bias, y, n, j0, k); break;
    case 4: group_times_rows<4, R>(x, w_rows, rows, bias, y, n, j0, k); break;
    case 5: group_times_rows<5, R>(x, w_rows, rows, bias, y, n, j0, k); break;
    case 6: group_times_rows<6, R>(x, w_rows, rows, bias, y, n, j0, k); break;
    case 7: group_times_rows<7, R>(x, w_rows, rows, bias, y, n, j0, k); break;
    default: group_times_rows<8, R>(x, w_rows, rows, bias, y, n, j0, k); break;
  }
}

// m input rows in groups of G (R weight rows a block): each block of weight
// rows is read from memory once, by one thread, and stays in L1 while every
// group of input rows passes over it.
template <int R, int G>
void rows_times_bf16_blocked(int64_t m, const float* x, const c10::BFloat16* w, const float* bias, float* y,
                             int64_t n, int64_t k) {
  const int threads = at::get_num_threads();
  const int64_t blocks = (n + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t j0 = block * R;
    const int rows = static_cast<int>(std::min<int64_t>(R, n - j0));
    const c10::BFloat16* w_rows[R];
    // A short last block reads its last row again; those sums are dropped.
    for (int r = 0; r < R; ++r) w_rows[r] = w + (j0 + std::min(r, rows - 1)) * k;
    // The block kPrefetchBlocks ahead, into L1: each matmul is a short stream
    // (a thread's half of a 576 x 576 weight is 330 KB), too short for the
    // hardware prefetcher to reach full speed on its own.
    const int64_t ahead = j0 + kPrefetchBlocks * R;
    if (ahead < n) {
      const char* first = reinterpret_cast<const char*>(w + ahead * k);
      const int64_t bytes = std::min<int64_t>(R, n - ahead) * k * sizeof(c10::BFloat16);
      for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(first + offset, _MM_HINT_T0);
    }
    for (int64_t g = 0; g < m; g += G) {
      const int group = static_cast<int>(std::min<int64_t>(G, m - g));
      group_dispatch<R>(group, x + g * k, w_rows, rows, bias, y + g * n, n, j0, k);
    }
  }
}

// 1 to kMaxBf16Rows rows; false when m is out of range.
bool bf16_blocked(int64_t m, const float* x, const c10::BFloat16* w, const float* b, float* y, int64_t n,
                  int64_t k) {
  if (m < 1 || m > kMaxBf16Rows) return false;
  if (m <= 4) {
    rows_times_bf16_blocked<4, 4>(m, x, w, b, y, n, k);
  } else {
    rows_times_bf16_blocked<2, 8>(m, x, w, b, y, n, k);
  }
  return true;
}
#endif

template <typename W>
void dispatch_rows(int64_t m, const float* x, const W* w, const float* b, float* y, int64_t n, int64_t k) {
  switch (m) {
    case 0: break;  // a step that samples nothing
    case 1: rows_times_weight<1>(x, w, b, y, n, k); break;
    case 2: rows_times_weight<2>(x, w, b, y, n, k); break;
    case 3: rows_times_weight<3>(x, w, b, y, n, k); break;
    case 4: rows_times_weight<4>(x, w, b, y, n, k); break;
    case 5: rows_times_weight<5>(x, w, b, y, n, k); break;
    case 6: rows_times_weight<6>(x, w, b, y, n, k); break;
    case 7: rows_times_weight<7>(x, w, b, y, n, k); break;
    default: rows_times_weight<8>(x, w, b, y, n, k); break;
  }
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "x [M, K] and weight [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fp32 x expected");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "fp32 or bf16 weight expected");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous x and weight expected");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
#if defined(__AVX512F__)
  const int64_t max_rows = weight.scalar_type() == at::kBFloat16 && k % 16 == 0 ? kMaxBf16Rows : kMaxRows;
#else
  const int64_t max_rows = kMaxRows;
#endif
  TORCH_CHECK(m <= max_rows, "small_linear takes at most ", max_rows, " rows here, got ", m);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "fp32 bias [N] expected");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  if (weight.scalar_type() == at::kFloat) {
    dispatch_rows(m, x.data_ptr<float>(), weight.data_ptr<float>(), b, y.data_ptr<float>(), n, k);
  } else {
    const auto* w = weight.data_ptr<c10::BFloat16>();
#if defined(__AVX512F__)
    // k in whole registers (SmolLM2's 576 and 1536; a chat's decode step, up to eight streams').
    if (k % 16 == 0 && bf16_blocked(m, x.data_ptr<float>(), w, b, y.data_ptr<float>(), n, k)) return y;
#endif
    dispatch_rows(m, x.data_ptr<float>(), w, b, y.data_ptr<float>(), n, k);
  }
  return y;
}

}  // namespace

// The schema is defined from Python (inference.kernels), as paged_decode_attention's.
TORCH_LIBRARY_IMPL(chatapp, CPU, m) { m.impl("small_linear", &small_linear); }
