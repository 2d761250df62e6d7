// A decoder layer's small element-wise ops, one pass each (inference/kernels.py).
//
// Between its four matmuls a layer runs RMSNorm twice (five torch ops each:
// square, mean, add, rsqrt, two multiplies), the rotary embedding (flip,
// multiply, addcmul) and SiLU(gate) * up (chunk, silu, multiply). On a decode
// step each of those ops touches a few thousand numbers, so its cost is the
// dispatch and the OpenMP fork and join, not the arithmetic. Here each is one
// op that reads its inputs once and writes its output once: on the 2-core
// EPYC at 32 rows, 5 us for an RMSNorm against 20, 5 for the rotary against
// 24, and one fp32 stream's decode step 6.5-7.2% shorter, paired in one
// engine (docs/BENCHMARKS.md "Fused element-wise ops").
//
// The arithmetic is the torch path's, op for op, in the same precision:
// statistics and products in fp32, rounded to the tensor's dtype wherever
// torch's separate ops round (bf16, fp16). What differs is the order in which
// RMSNorm sums a row's squares (sixteen fixed lanes, then across them) and
// glibc's vector exp against Sleef's: the last bits of a value, as between
// oneDNN's and MKL's matmuls. The lanes are fixed, not left to the
// vectoriser's alignment peeling, so a row's result depends on its values
// only, never on where it lies in the batch.
//
// Rows are split between the calling thread's torch count of OpenMP threads
// (not at::parallel_for: see paged_attention.cpp) only when there are enough
// numbers to pay for the fork; a decode step's few rows run on the calling
// thread.
#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "storage.h"

#include <bit>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

// bf16 and fp16 converted in code the compiler vectorises (storage.h).
using chatapp::BF16;
using chatapp::F16;
using chatapp::F32;
using chatapp::data;

// Below this many numbers an op runs on the calling thread: an OpenMP fork
// and join costs more than a pass over them.
constexpr int64_t kParallelMin = 1 << 13;
constexpr int kLanes = 16;

// The value as torch's op would store it in the dtype (fp32: itself).
template <typename D>
inline float round_to(float value) { return D::load(D::store(value)); }

inline int threads_for(int64_t numbers) { return numbers >= kParallelMin ? at::get_num_threads() : 1; }

// out = weight * to(T)(x * rsqrt(mean(x^2) + eps)), per row of n (HF's LlamaRMSNorm).
template <typename D, typename T = typename D::storage>
void rms_norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * n))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    float lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float v = D::load(xr[i + l]);
        lanes[l] += v * v;
      }
    }
    for (int64_t t = 0; i < n; ++i, ++t) {
      const float v = D::load(xr[i]);
      lanes[t] += v * v;
    }
    float sum = 0.f;
    for (int l = 0; l < kLanes; ++l) sum += lanes[l];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
    T* o = out + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float normed = round_to<D>(D::load(xr[j]) * inv);
      o[j] = D::store(D::load(weight[j]) * normed);
    }
  }
}

// out [rows, half] = silu(gate) * up, gate_up [rows, 2 * half] = [gate | up].
template <typename D, typename T = typename D::storage>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t half) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * half))
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = gate_up + r * 2 * half;
    const T* up = gate + half;
    T* o = out + r * half;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float g = D::load(gate[j]);
      const float silu = round_to<D>(g / (1.f + std::exp(-g)));
      o[j] = D::store(silu * D::load(up[j]));
    }
  }
}

// out [rows, heads, dim] = x * cos + swap_halves(x) * signed_sin, cos and
// signed_sin [rows, dim] shared by a row's heads (inference.layer_ops.rotate).
// x's rows may be strided (a slice of the fused QKV output); its heads are not.
template <typename D, typename T = typename D::storage>
void rotary_rows(const T* x, int64_t x_row_stride, const T* cos, const T* signed_sin, T* out, int64_t rows,
                 int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * heads * dim))
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * dim;
    const T* s = signed_sin + r * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xh = x + r * x_row_stride + h * dim;
      T* o = out + (r * heads + h) * dim;
      // Two halves, each reading the other: no per-value index choice, so both vectorise.
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float scaled = round_to<D>(D::load(xh[j]) * D::load(c[j]));
        o[j] = D::store(scaled + D::load(xh[j + half]) * D::load(s[j]));
      }
#pragma omp simd
      for (int64_t j = half; j < dim; ++j) {
        const float scaled = round_to<D>(D::load(xh[j]) * D::load(c[j]));
        o[j] = D::store(scaled + D::load(xh[j - half]) * D::load(s[j]));
      }
    }
  }
}

// out[r] = the index of row r's largest value, the first on ties, a NaN
// counting as larger than any number (torch.argmax's rule): the greedy
// sampler's pick. torch's reduction read SmolLM2's 32 x 49,152 fp32 logits
// at about 3 GB/s (1.9 ms a decode step at 32 rows on the AMX Xeon). Here one
// vectorised pass finds the maximum and whether a NaN is there, a second the
// first index that holds it, sixteen values at a time.
constexpr int64_t kArgmaxParallelMin = 1 << 20;

inline bool is_nan_bits(float v) { return (std::bit_cast<std::uint32_t>(v) & 0x7FFFFFFFu) > 0x7F800000u; }

void argmax_rows(const float* x, int64_t* out, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) num_threads(rows * n >= kArgmaxParallelMin ? at::get_num_threads() : 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * n;
    float lanes[kLanes];
    std::uint32_t nan_lanes[kLanes] = {};
    for (int l = 0; l < kLanes; ++l) lanes[l] = row[0];
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float v = row[i + l];
        lanes[l] = v > lanes[l] ? v : lanes[l];
        nan_lanes[l] |= is_nan_bits(v);
      }
    }
    float peak = lanes[0];
    bool nan = false;
    for (int l = 0; l < kLanes; ++l) {
      peak = lanes[l] > peak ? lanes[l] : peak;
      nan = nan || nan_lanes[l];
    }
    for (; i < n; ++i) {
      peak = row[i] > peak ? row[i] : peak;
      nan = nan || is_nan_bits(row[i]);
    }
    int64_t found = 0;
    for (int64_t base = 0; base < n; base += kLanes) {
      const int64_t count = std::min<int64_t>(kLanes, n - base);
      bool hit = false;
      for (int64_t l = 0; l < count; ++l) hit = hit || (nan ? is_nan_bits(row[base + l]) : row[base + l] == peak);
      if (hit) {
        for (int64_t l = 0; l < count; ++l)
          if (nan ? is_nan_bits(row[base + l]) : row[base + l] == peak) {
            found = base + l;
            break;
          }
        break;
      }
    }
    out[r] = found;
  }
}

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              what, ": fp32, bf16 or fp16 expected, got ", t.scalar_type());
}

#define CHATAPP_DISPATCH(dtype, CALL)                          \
  switch (dtype) {                                             \
    case at::kFloat: { using D = F32; CALL; break; }           \
    case at::kBFloat16: { using D = BF16; CALL; break; }       \
    default: { using D = F16; CALL; break; }                   \
  }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float(x, "rms_norm");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x [T, N] and weight [N] expected");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), n = x.size(1);
  const float e = static_cast<float>(eps);
  CHATAPP_DISPATCH(x.scalar_type(), rms_norm_rows<D>(data<D>(xc), data<D>(wc), data<D>(out), rows, n, e));
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_float(gate_up, "silu_mul");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up [T, 2 * I] expected");
  const at::Tensor gc = gate_up.contiguous();
  const int64_t rows = gate_up.size(0), half = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, half}, gate_up.options());
  CHATAPP_DISPATCH(gate_up.scalar_type(), silu_mul_rows<D>(data<D>(gc), data<D>(out), rows, half));
  return out;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  check_float(x, "rotary");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x [T, heads, D] with an even D expected");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && signed_sin.scalar_type() == x.scalar_type(),
              "x, cos and signed_sin must share a dtype");
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(cos.numel() == rows * dim && signed_sin.numel() == rows * dim, "cos and signed_sin [T, 1, D] expected");
  // Heads and values packed within a row; the rows themselves may be strided.
  const at::Tensor xc = (x.stride(2) == 1 && x.stride(1) == dim) ? x : x.contiguous();
  const at::Tensor cc = cos.contiguous(), sc = signed_sin.contiguous();
  at::Tensor out = at::empty({rows, heads, dim}, x.options());
  const int64_t row_stride = xc.stride(0);
  CHATAPP_DISPATCH(x.scalar_type(), rotary_rows<D>(data<D>(xc), row_stride, data<D>(cc), data<D>(sc),
                                                   data<D>(out), rows, heads, dim));
  return out;
}

at::Tensor argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.size(1) > 0,
              "argmax: fp32 logits [N, V] expected");
  const at::Tensor lc = logits.contiguous();
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  argmax_rows(lc.data_ptr<float>(), out.data_ptr<int64_t>(), logits.size(0), logits.size(1));
  return out;
}

}  // namespace

// The schemas are defined from Python (inference.kernels), as paged_decode_attention's.
TORCH_LIBRARY_IMPL(chatapp, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotary", &rotary);
  m.impl("argmax", &argmax);
}
