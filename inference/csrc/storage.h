// A dtype's storage and its conversions to and from fp32, shared by the
// library's sources (inference/kernels.py hashes this header with them).
#pragma once

#include <ATen/core/Tensor.h>

#include <bit>
#include <cstdint>

namespace chatapp {

// Written so that the compiler vectorises them: c10::BFloat16's and
// c10::Half's own conversions are scalar calls inside the loops (measured on
// the AMX Xeon, fused_ops.cpp's bf16 loops ran 2-6.5x slower than torch's ops
// with them: SiLU * up at 512 rows 3.2 against 0.52 ms). bf16 is fp32's top
// half, rounded to nearest even (c10's rule, NaN kept a quiet NaN); fp16 is
// the compiler's _Float16 (IEEE rounding, as c10's).
struct F32 {
  using storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

struct BF16 {
  using storage = std::uint16_t;
  static float load(std::uint16_t bits) { return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16); }
  static std::uint16_t store(float v) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(v);
    const std::uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    // Integer test, not isnan: -ffast-math would drop the latter.
    return static_cast<std::uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
};

struct F16 {
  using storage = _Float16;
  static float load(_Float16 v) { return static_cast<float>(v); }
  static _Float16 store(float v) { return static_cast<_Float16>(v); }
};

// data<D>(t): t's numbers as D's storage (bf16's and fp16's bits as they lie).
template <typename D>
typename D::storage* data(const at::Tensor& t) { return static_cast<typename D::storage*>(t.data_ptr()); }

}  // namespace chatapp
