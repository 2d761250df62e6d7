// fp32 matmuls of a few rows against a row-major fp32 or bf16 weight, or of
// any number of rows against a bf16 or int8 weight packed for AVX-512
// (inference/kernels.py).
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
// int8 weights ("int8_weight_only" in fp32) halve them again: four k steps of
// 16 columns a 64-byte line, each widened exactly to fp32 (two instructions),
// the sum scaled by its column's fp32 scale at the end. A forward's layer
// matmuls of SmolLM2-135M at one row took 4.1-4.7 ms against 9.1-9.4 over
// packed bf16 and 10.4-10.8 in oneDNN's int8-weight kernel (which rounds the
// activations to bf16); at 32 rows 26 ms against 25 and 59 (the AMX Xeon).
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
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;  // fp32 or row-major bf16 weights
constexpr int64_t kMaxPackedRows = 64;  // packed bf16 or int8 weights, on AVX-512, in one call of the loop

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
// bf16 weights packed for this loop (inference.kernels.pack_small_weight):
// [N / 16, K / 2, 32], block b holding output columns 16b..16b+15 and, for
// each pair of k, 32 halves in which 32-bit lane j is column j's weight at
// the even k (low half) and at the odd k (high half). One 64-byte load holds
// two k steps of 16 columns; widening is one shift or one mask a register.
// Each output is one fp32 register lane's running sum over k in order
// 0, 1, 2, ..., a fused multiply-add a step, whatever the row count, block
// width or thread count: a row's bits are the same alone or among 63 others.
// A row-major loop sums each (input row, weight row) pair in its own register
// and ends with a sum across lanes; this one's version (up to 32 rows, two
// weight rows at a time) read every input row again for each pair of weight
// rows, and past eight rows the inputs outgrew L1 and its FMAs waited on L2.
// Here an input element is broadcast once per NB blocks of 16 columns, and a
// tile's weights (K x 16 NB halves) are read from memory once, by the group
// of rows that comes first; the groups read the next tile into cache meanwhile.
// A forward's layer matmuls of SmolLM2-135M on the 2-core AMX Xeon (each
// layer's weights its own copy, as in a step), ms: 1 row 11.2 -> 9.0, 8 rows
// 17.3 -> 10.5, 32 rows 43.7 -> 27.4 (docs/BENCHMARKS.md "small_linear over
// packed bf16 weights").
template <int M, int NB, bool I8>
inline void packed_tile(const float* x, int64_t k, const uint8_t* w, int64_t block_stride, const float* bias,
                        float* y, int64_t n, int64_t col0, const uint8_t* next, int share, int shares) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  constexpr int kPerLine = I8 ? 4 : 2;  // k steps of 16 columns in one 64-byte line
  const int64_t lines = k / kPerLine;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t p = 0; p < lines; ++p) {
    if (next && p % shares == 0) {  // this group's share of the next tile: lines / shares in a row
      const int64_t line = share * (lines / shares) + p / shares;
      for (int b = 0; b < NB; ++b)
        _mm_prefetch(reinterpret_cast<const char*>(next + b * block_stride + line * 64), _MM_HINT_T0);
    }
    __m512 wv[NB];
    for (int kk = 0; kk < kPerLine; ++kk) {
      for (int b = 0; b < NB; ++b) {
        const uint8_t* line = w + b * block_stride + p * 64;
        if constexpr (I8) {
          // 16 int8 weights of one k, widened to fp32 exactly (|q| <= 127).
          const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 16 * kk));
          wv[b] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
        } else {
          const __m512i pair = _mm512_loadu_si512(line);
          wv[b] = _mm512_castsi512_ps(kk == 0 ? _mm512_slli_epi32(pair, 16) : _mm512_and_si512(pair, high));
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_set1_ps(x[(kPerLine * p + kk) * M + m]);
        for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(xv, wv[b], acc[m][b]);
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t col = col0 + 16 * b;
    const __m512 bv = bias ? _mm512_loadu_ps(bias + col) : _mm512_setzero_ps();
    if constexpr (I8) {
      // The block's 16 column scales fill the line after its weights.
      const __m512 scale = _mm512_loadu_ps(reinterpret_cast<const float*>(w + b * block_stride + lines * 64));
      for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * n + col, _mm512_fmadd_ps(acc[m][b], scale, bv));
    } else {
      for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * n + col, _mm512_add_ps(acc[m][b], bv));
    }
  }
}

template <int NB, bool I8>
inline void packed_group(int m, const float* x, int64_t k, const uint8_t* w, int64_t block_stride,
                         const float* bias, float* y, int64_t n, int64_t col0, const uint8_t* next, int share,
                         int shares) {
  switch (m) {
    case 1: packed_tile<1, NB, I8>(x, k, w, block_stride, bias, y, n, col0, next, share, shares); break;
    case 2: packed_tile<2, NB, I8>(x, k, w, block_stride, bias, y, n, col0, next, share, shares); break;
    case 3: packed_tile<3, NB, I8>(x, k, w, block_stride, bias, y, n, col0, next, share, shares); break;
    case 4: packed_tile<4, NB, I8>(x, k, w, block_stride, bias, y, n, col0, next, share, shares); break;
    case 5: packed_tile<5, NB, I8>(x, k, w, block_stride, bias, y, n, col0, next, share, shares); break;
    case 6: packed_tile<6, NB, I8>(x, k, w, block_stride, bias, y, n, col0, next, share, shares); break;
    case 7: packed_tile<7, NB, I8>(x, k, w, block_stride, bias, y, n, col0, next, share, shares); break;
    default: packed_tile<8, NB, I8>(x, k, w, block_stride, bias, y, n, col0, next, share, shares); break;
  }
}

// Tiles of NB blocks (a short last one block by block), split statically
// between the threads; in each, the input rows in groups of at most G, as
// even as the count allows. Each group's rows are first interleaved
// (element kk of row m at kk * rows + m), so that a tile's broadcasts come
// from one pointer at fixed offsets: eight row pointers beside the loop's
// own did not fit the general registers, and their reloads slowed it.
template <int NB, int G, bool I8>
void rows_times_packed(int64_t m, const float* x, const uint8_t* w, const float* bias, float* y, int64_t n,
                       int64_t k) {
  const int threads = at::get_num_threads();
  // A block: its lines of weights, and under int8 one more of scales.
  const int64_t blocks = n / 16, block_stride = I8 ? (k / 4 + 1) * 64 : k / 2 * 64;
  const int64_t tiles = (blocks + NB - 1) / NB;
  const int64_t groups = (m + G - 1) / G;
  int64_t starts[kMaxPackedRows + 1];
  for (int64_t g = 0; g <= groups; ++g) starts[g] = g * m / groups;
  std::vector<float> interleaved(m * k);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t rows = starts[g + 1] - starts[g];
    float* out = interleaved.data() + starts[g] * k;
    for (int64_t r = 0; r < rows; ++r) {
      const float* in = x + (starts[g] + r) * k;
      for (int64_t kk = 0; kk < k; ++kk) out[kk * rows + r] = in[kk];
    }
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t b0 = tile * NB, nb = std::min<int64_t>(NB, blocks - b0);
    for (int64_t g = 0; g < groups; ++g) {
      const int rows = static_cast<int>(starts[g + 1] - starts[g]);
      const float* xg = interleaved.data() + starts[g] * k;
      float* yg = y + starts[g] * n;
      if (nb == NB) {
        // The groups read the next tile into cache meanwhile, each a contiguous
        // share of its k: all from the first group, when the loads of a tile
        // came in one burst, was 7-12% slower at 12 to 32 rows.
        const uint8_t* next = b0 + 2 * NB <= blocks ? w + (b0 + NB) * block_stride : nullptr;
        packed_group<NB, I8>(rows, xg, k, w + b0 * block_stride, block_stride, bias, yg, n, 16 * b0, next,
                             static_cast<int>(g), static_cast<int>(groups));
      } else {
        for (int64_t b = b0; b < b0 + nb; ++b)
          packed_group<1, I8>(rows, xg, k, w + b * block_stride, block_stride, bias, yg, n, 16 * b, nullptr, 0,
                              1);
      }
    }
  }
}

// Blocks a tile and rows a group by the row count: few rows are as many
// sums as the registers hold (FMA latency), more share each widened weight
// register between the rows of a group of eight (24 sums, 3 weights, 1 input).
template <bool I8>
void packed_dispatch(int64_t m, const float* x, const uint8_t* w, const float* b, float* y, int64_t n, int64_t k) {
  if (m <= 2) {
    rows_times_packed<8, 2, I8>(m, x, w, b, y, n, k);
  } else if (m <= 4) {
    rows_times_packed<6, 4, I8>(m, x, w, b, y, n, k);
  } else {
    rows_times_packed<3, 8, I8>(m, x, w, b, y, n, k);
  }
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

// The bias as the loops read it (nullptr for none), checked against n outputs.
const float* bias_data(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
              "fp32 bias [N] expected");
  return bias->data_ptr<float>();
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const bool packed = weight.dim() == 3;  // bf16 or int8 packed for the AVX-512 loop (see packed_tile)
  const bool int8 = packed && weight.scalar_type() == at::kChar;
  if (packed) {
#if defined(__AVX512F__)
    if (int8) {
      TORCH_CHECK(x.dim() == 2 && weight.size(2) == 64 && x.size(1) == 4 * (weight.size(1) - 1) &&
                      weight.is_contiguous(),
                  "x [M, K] and a packed int8 weight [N / 16, K / 4 + 1, 64] expected");
    } else {
      TORCH_CHECK(x.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(2) == 32 &&
                      x.size(1) == 2 * weight.size(1) && weight.is_contiguous(),
                  "x [M, K] and a packed bf16 weight [N / 16, K / 2, 32] expected");
    }
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "contiguous fp32 x expected");
#else
    TORCH_CHECK(false, "packed weights need AVX-512, which this build lacks");
#endif
  } else {
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
                "x [M, K] and weight [N, K] expected");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "fp32 x expected");
    TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
                "fp32 or bf16 weight expected");
    TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous x and weight expected");
  }
  const int64_t m = x.size(0), k = x.size(1), n = packed ? 16 * weight.size(0) : weight.size(0);
  TORCH_CHECK(packed || m <= kMaxRows, "small_linear takes at most ", kMaxRows, " rows here, got ", m);
  const float* b = bias_data(bias, n);
  at::Tensor y = at::empty({m, n}, x.options());
  if (packed) {
#if defined(__AVX512F__)
    // Any row count, in calls of up to kMaxPackedRows: a row's sums do not
    // depend on the rows beside it, so the chunks give the bits one call would.
    const uint8_t* w = int8 ? reinterpret_cast<const uint8_t*>(weight.data_ptr<int8_t>())
                            : reinterpret_cast<const uint8_t*>(weight.data_ptr<c10::BFloat16>());
    for (int64_t start = 0; start < m; start += kMaxPackedRows) {
      const int64_t rows = std::min(kMaxPackedRows, m - start);
      const float* xs = x.data_ptr<float>() + start * k;
      float* ys = y.data_ptr<float>() + start * n;
      if (int8) {
        packed_dispatch<true>(rows, xs, w, b, ys, n, k);
      } else {
        packed_dispatch<false>(rows, xs, w, b, ys, n, k);
      }
    }
#endif
  } else if (weight.scalar_type() == at::kFloat) {
    dispatch_rows(m, x.data_ptr<float>(), weight.data_ptr<float>(), b, y.data_ptr<float>(), n, k);
  } else {
    dispatch_rows(m, x.data_ptr<float>(), weight.data_ptr<c10::BFloat16>(), b, y.data_ptr<float>(), n, k);
  }
  return y;
}

}  // namespace

// The schema is defined from Python (inference.kernels), as paged_decode_attention's.
TORCH_LIBRARY_IMPL(chatapp, CPU, m) { m.impl("small_linear", &small_linear); }
